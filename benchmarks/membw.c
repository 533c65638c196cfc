/* Memory read bandwidth of this machine, the ceiling decode's weight streaming runs against: each
   OpenMP thread sums its share of a buffer with 512-bit (or 256-bit) loads, best of 5 passes.

       gcc -O2 -march=native -fopenmp benchmarks/membw.c -o /tmp/membw
       OMP_NUM_THREADS=1 /tmp/membw 100      # MiB; 2 threads: OMP_NUM_THREADS=2 */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char** argv) {
    size_t n = (size_t)(argc > 1 ? atoi(argv[1]) : 100) << 20;
    char* b = aligned_alloc(64, n);
    for (size_t i = 0; i < n; i++) b[i] = (char)i;
    double best = 0.0;
    long long sink = 0;
    for (int rep = 0; rep < 5; rep++) {
        double t = now();
        #pragma omp parallel reduction(+ : sink)
        {
            size_t lo = n / omp_get_num_threads() * omp_get_thread_num(), hi = lo + n / omp_get_num_threads();
#ifdef __AVX512F__
            __m512i a = _mm512_setzero_si512();
            for (size_t i = lo; i + 64 <= hi; i += 64) a = _mm512_add_epi32(a, _mm512_load_si512(b + i));
            sink += _mm512_reduce_add_epi32(a);
#else
            __m256i a = _mm256_setzero_si256();
            for (size_t i = lo; i + 32 <= hi; i += 32) a = _mm256_add_epi32(a, _mm256_load_si256((const __m256i*)(b + i)));
            sink += _mm256_extract_epi32(a, 0);
#endif
        }
        double gbs = n / (now() - t) / 1e9;
        best = gbs > best ? gbs : best;
    }
    printf("%zu MiB, %d threads: %.1f GB/s (checksum %lld)\n", n >> 20, omp_get_max_threads(), best, sink & 1);
    free(b);
    return 0;
}
