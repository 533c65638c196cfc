/* The GEMM library (kernels/cpu_gemm.py). */
#include "gemm.h"
