/* SentencePiece Unigram and BPE encoding (Python side and why: tokenization/native_spm.py). */
#include <float.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

enum { NORMAL = 1, UNKNOWN = 2, CONTROL = 3, USER_DEFINED = 4, UNUSED = 5, BYTE = 6 };

/* ---- a double-array trie over bytes ---------------------------------------------------------
   From node s, byte c leads to t = base[s] + c when check[t] == s. Free slots have check -1 and
   the root (slot 0) -2, so neither ever matches a parent. Every base is at most size - 256, so a
   walk needs no bounds check. */
typedef struct { int32_t base, check, value; float score; } DaNode;
typedef struct { DaNode *nodes; int64_t size; } Trie;

typedef struct { const uint8_t *key; int32_t len, value; float score; } Key;

typedef struct {
    Trie t;
    int64_t cap;
    int64_t *next_free; /* union-find: next_free[p] leads to the first free slot >= p */
} DaBuilder;

static int da_reserve(DaBuilder *b, int64_t need) {
    if (need <= b->cap) return 0;
    int64_t cap = b->cap ? b->cap : 1024;
    while (cap < need) cap *= 2;
    DaNode *nodes = realloc(b->t.nodes, cap * sizeof(DaNode));
    if (!nodes) return -1;
    b->t.nodes = nodes;
    int64_t *next = realloc(b->next_free, (cap + 1) * sizeof(int64_t));
    if (!next) return -1;
    b->next_free = next;
    for (int64_t i = b->cap; i < cap; i++) {
        nodes[i] = (DaNode){0, -1, -1, 0.0f};
        next[i] = i;
    }
    next[cap] = cap;
    b->cap = cap;
    return 0;
}

static int64_t da_find_free(DaBuilder *b, int64_t p) {
    int64_t root = p;
    while (b->next_free[root] != root) root = b->next_free[root];
    while (b->next_free[p] != root) { int64_t n = b->next_free[p]; b->next_free[p] = root; p = n; }
    return root;
}

static void da_use(DaBuilder *b, int64_t p, int32_t parent) {
    b->t.nodes[p].check = parent;
    b->next_free[p] = p + 1;
}

/* Adds keys[lo:hi), sorted and sharing their first `depth` bytes, below node s. */
static int da_insert(DaBuilder *b, int32_t s, const Key *keys, int32_t lo, int32_t hi, int32_t depth) {
    if (lo < hi && keys[lo].len == depth) { /* the shortest key ends here */
        b->t.nodes[s].value = keys[lo].value;
        b->t.nodes[s].score = keys[lo].score;
        lo++;
    }
    if (lo == hi) return 0;
    int32_t labels[256], starts[257], n = 0;
    for (int32_t i = lo; i < hi; i++) {
        int32_t c = keys[i].key[depth];
        if (n == 0 || labels[n - 1] != c) { labels[n] = c; starts[n] = i; n++; }
    }
    starts[n] = hi;
    int64_t base;
    for (int64_t p = labels[0];; p++) { /* free slots p for the first label, in order */
        if (da_reserve(b, p + 512)) return -1;
        p = da_find_free(b, p);
        if (da_reserve(b, p + 512)) return -1;
        base = p - labels[0];
        int ok = 1;
        for (int32_t j = 1; j < n && ok; j++) ok = b->t.nodes[base + labels[j]].check == -1;
        if (ok) break;
    }
    b->t.nodes[s].base = (int32_t)base;
    for (int32_t j = 0; j < n; j++) da_use(b, base + labels[j], s);
    if (b->t.size < base + 256) b->t.size = base + 256;
    for (int32_t j = 0; j < n; j++)
        if (da_insert(b, (int32_t)(base + labels[j]), keys, starts[j], starts[j + 1], depth + 1)) return -1;
    return 0;
}

static int key_cmp(const void *a, const void *b) {
    const Key *x = a, *y = b;
    int32_t n = x->len < y->len ? x->len : y->len;
    int c = memcmp(x->key, y->key, n);
    return c ? c : (x->len > y->len) - (x->len < y->len);
}

/* A trie of keys (sorted here, distinct, non-empty); 0 or -1 (out of memory). */
static int trie_build(Trie *out, Key *keys, int32_t n) {
    qsort(keys, n, sizeof(Key), key_cmp);
    DaBuilder b = {{NULL, 256}, 0, NULL};
    if (da_reserve(&b, 1024)) goto fail;
    da_use(&b, 0, -2);
    if (da_insert(&b, 0, keys, 0, n, 0)) goto fail;
    free(b.next_free);
    out->nodes = b.t.nodes;
    out->size = b.t.size;
    return 0;
fail:
    free(b.t.nodes);
    free(b.next_free);
    return -1;
}

/* Length in bytes of the longest key that prefixes s[0:len), or 0; *node gets its trie node. */
static int64_t trie_longest(const Trie *t, const uint8_t *s, int64_t len, int32_t *node) {
    int32_t at = 0;
    int64_t best = 0;
    for (int64_t k = 0; k < len; k++) {
        int32_t next = t->nodes[at].base + s[k];
        if (t->nodes[next].check != at) break;
        at = next;
        if (t->nodes[at].value >= 0) { best = k + 1; *node = at; }
    }
    return best;
}

/* ---- the model ------------------------------------------------------------------------------ */
typedef struct {
    Trie pieces;           /* NORMAL and USER_DEFINED pieces; value = id | USER_FLAG for the latter */
    Trie user;             /* USER_DEFINED pieces, which the normalizer keeps whole (size 0: none) */
    uint32_t *cmap;        /* the character map's darts-clone units, or NULL */
    int64_t cmap_units;
    char *cmap_strings;    /* its NUL-terminated replacements */
    int64_t cmap_strings_len;
    uint8_t may_start[256]; /* bytes at which a user-defined piece or a map entry may start */
    float min_score, unk_score;
    int32_t unk_id, byte_fallback, byte_ids[256];
    int32_t add_dummy_prefix, remove_extra_whitespaces, escape_whitespaces;
    /* BPE: pieces holds NORMAL, USER_DEFINED and UNUSED pieces (sentencepiece's pieces_), value =
       id | UNUSED_FLAG for the last */
    int32_t bpe;
    int32_t bpe_whole;       /* UNUSED pieces may merge: one agenda over the text (see bpe_resegment) */
    int32_t bpe_split_space; /* no NORMAL piece holds a character then the space symbol */
    int32_t n_unused, *unused_slot; /* an index per UNUSED piece id (for Work.rev) */
    uint8_t user_start[256];  /* bytes at which a user-defined piece may start */
} Model;

#define USER_FLAG 0x40000000
#define UNUSED_FLAG 0x20000000
#define ID_MASK 0x1FFFFFFF

void spm_free_model(Model *m);

int spm_free(void *model) {
    spm_free_model(model);
    return 0;
}

void spm_free_model(Model *m) {
    if (!m) return;
    free(m->pieces.nodes);
    free(m->user.nodes);
    free(m->cmap);
    free(m->cmap_strings);
    free(m->unused_slot);
    free(m);
}

static int64_t cmap_offset(uint32_t unit) { return (int64_t)(unit >> 10) << ((unit & 512) >> 6); }

/* darts-clone commonPrefixSearch, keeping the longest match: its byte length (0: none). */
static int64_t cmap_longest(const Model *m, const uint8_t *s, int64_t len, const char **rep) {
    const uint32_t *u = m->cmap;
    int64_t node = cmap_offset(u[0]), best = 0;
    for (int64_t k = 0; k < len; k++) {
        node ^= s[k];
        if (node >= m->cmap_units) break;
        uint32_t unit = u[node];
        if ((unit & 0x800000FFu) != s[k]) break;
        node ^= cmap_offset(unit);
        if (unit & 256) {
            int64_t value = u[node] & 0x7FFFFFFF;
            if (value < m->cmap_strings_len) { best = k + 1; *rep = m->cmap_strings + value; }
        }
    }
    return best;
}

/* Bytes of the UTF-8 character that starts with byte c (sentencepiece's OneCharLen). */
static inline int32_t char_len(uint8_t c) { return "\1\1\1\1\1\1\1\1\1\1\1\1\2\2\3\4"[c >> 4]; }

/* sentencepiece's NormalizePrefix: the replacement (*rep, *rep_len) of the text at s; returns the
   bytes consumed. */
static int64_t normalize_prefix(const Model *m, const uint8_t *s, int64_t len, const uint8_t **rep,
                                int64_t *rep_len) {
    if (m->may_start[s[0]]) {
        int32_t node;
        int64_t n = m->user.size ? trie_longest(&m->user, s, len, &node) : 0;
        if (n) { *rep = s; *rep_len = n; return n; }
        const char *value;
        if (m->cmap && (n = cmap_longest(m, s, len, &value))) {
            *rep = (const uint8_t *)value;
            *rep_len = (int64_t)strnlen(value, m->cmap_strings + m->cmap_strings_len - value);
            return n;
        }
    }
    int64_t n = char_len(s[0]);
    n = n < len ? n : len;
    *rep = s;
    *rep_len = n;
    return n;
}

typedef struct { uint8_t *p; int64_t n, cap; } Buf;

static int buf_reserve(Buf *b, int64_t extra) {
    if (b->n + extra <= b->cap) return 0;
    int64_t cap = b->cap ? b->cap : 256;
    while (cap < b->n + extra) cap *= 2;
    uint8_t *p = realloc(b->p, cap);
    if (!p) return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

static const uint8_t SPACE_SYMBOL[3] = {0xE2, 0x96, 0x81}; /* U+2581 */

static void put_space(const Model *m, Buf *out) {
    if (m->escape_whitespaces) { memcpy(out->p + out->n, SPACE_SYMBOL, 3); out->n += 3; }
    else out->p[out->n++] = ' ';
}

/* sentencepiece's Normalizer::Normalize (treat_whitespace_as_suffix off) into out; 0 or -1. */
static int normalize(const Model *m, const uint8_t *in, int64_t len, Buf *out) {
    const uint8_t *rep;
    int64_t rep_len;
    out->n = 0;
    if (m->remove_extra_whitespaces) { /* leading characters that normalize to one space */
        while (len > 0) {
            int64_t used = normalize_prefix(m, in, len, &rep, &rep_len);
            if (rep_len != 1 || rep[0] != ' ') break;
            in += used;
            len -= used;
        }
    }
    if (len == 0) return 0;
    if (buf_reserve(out, len * 3 + 16)) return -1;
    if (m->add_dummy_prefix) put_space(m, out);
    int prev_space = m->remove_extra_whitespaces;
    while (len > 0) {
        int64_t used = normalize_prefix(m, in, len, &rep, &rep_len);
        in += used;
        len -= used;
        if (prev_space)
            while (rep_len > 0 && rep[0] == ' ') { rep++; rep_len--; }
        if (rep_len > 0) {
            if (buf_reserve(out, rep_len * 3)) return -1;
            for (int64_t i = 0; i < rep_len; i++) {
                if (rep[i] == ' ') put_space(m, out);
                else out->p[out->n++] = rep[i];
            }
            prev_space = rep[rep_len - 1] == ' ';
        }
        if (!m->remove_extra_whitespaces) prev_space = 0;
    }
    if (m->remove_extra_whitespaces) { /* trailing spaces, escaped or not */
        if (m->escape_whitespaces)
            while (out->n >= 3 && !memcmp(out->p + out->n - 3, SPACE_SYMBOL, 3)) out->n -= 3;
        else
            while (out->n >= 1 && out->p[out->n - 1] == ' ') out->n--;
    }
    return 0;
}

/* ---- Viterbi (unigram_model.cc, Model::EncodeOptimized) ------------------------------------
   As the sentencepiece release computes it (0.2.x, read from its machine code, which differs from
   older sources): scores are floats summed in float; a user-defined piece scores
   (float)(0.1 * (bytes - 1)); and when the score of the best path reaching a start position
   leaves [-1e5, 1e5], that score is subtracted from it and from every best path already found
   past it (a rebase that keeps long texts precise, and that changes float rounding, so it is
   reproduced step by step). */
typedef struct { float score; int32_t start, id; } Best; /* best path ending at a byte position */

/* Keeps the best candidate for the path ending at target: strictly higher replaces, so the
   earliest start wins ties. */
static inline void offer(Best *target, float candidate, int64_t start, int32_t id) {
    if (target->start == -1 || candidate > target->score) {
        target->score = candidate;
        target->start = (int32_t)start;
        target->id = id;
    }
}

/* Fills best[0..n] for text s[0:n). */
static void viterbi(const Model *m, const uint8_t *s, int64_t n, Best *best) {
    const DaNode *nodes = m->pieces.nodes;
    for (int64_t i = 0; i <= n; i++) best[i] = (Best){0.0f, -1, -1};
    int64_t last = 0; /* the furthest end position any candidate has reached */
    for (int64_t start = 0; start < n;) {
        float here = best[start].score;
        if (here < -1e5f || here > 1e5f) {
            for (int64_t j = start; j <= last; j++)
                if (j == start || best[j].start != -1) best[j].score -= here;
            here = 0.0f;
        }
        int64_t mblen = char_len(s[start]);
        if (mblen > n - start) mblen = n - start;
        int single = 0;
        int32_t at = 0;
        for (int64_t k = start; k < n; k++) {
            int32_t next = nodes[at].base + s[k];
            if (nodes[next].check != at) break;
            at = next;
            int32_t value = nodes[at].value;
            if (value < 0) continue;
            int64_t length = k + 1 - start;
            if (k + 1 > last) last = k + 1;
            float score = value & USER_FLAG ? (float)((double)(int32_t)(length - 1) * 0.1) : nodes[at].score;
            offer(&best[k + 1], score + here, start, value & ~USER_FLAG);
            single |= length == mblen;
        }
        if (!single) {
            offer(&best[start + mblen], here + m->unk_score, start, m->unk_id);
            if (start + mblen > last) last = start + mblen;
        }
        start += mblen;
    }
}

/* Ids of the best path into out[0:cap): runs of unknown pieces as one unknown id, or with byte
   fallback as byte pieces. Returns the count, which may exceed cap (nothing is written past cap). */
static int64_t emit(const Model *m, const uint8_t *s, int64_t n, const Best *best, int32_t *path,
                    int32_t *out, int64_t cap) {
    int64_t k = 0;
    for (int64_t end = n; end > 0; end = best[end].start) k++;
    int64_t i = k;
    for (int64_t end = n; end > 0; end = best[end].start) path[--i] = (int32_t)end;
    int64_t count = 0;
    int prev_unk = 0;
#define PUT(v) do { if (count < cap) out[count] = (v); count++; } while (0)
    for (i = 0; i < k; i++) {
        const Best *b = &best[path[i]];
        if (b->id != m->unk_id) { PUT(b->id); prev_unk = 0; continue; }
        if (m->byte_fallback)
            for (int64_t j = b->start; j < path[i]; j++) PUT(m->byte_ids[s[j]]);
        else if (!prev_unk)
            PUT(b->id);
        prev_unk = 1;
    }
#undef PUT
    return count;
}

/* ---- BPE (bpe_model.cc, Model::SampleEncode without dropout) ---------------------------------
   The normalized text is split into characters, a user-defined piece (longest) being one frozen
   symbol that never merges; then, while some adjacent pair of symbols concatenates to a piece
   (NORMAL, USER_DEFINED or UNUSED), the pair of highest score merges, the leftmost on ties.
   UNUSED pieces merge like others, then are split back ("resegmented") into the two parts of the
   last pair that formed them anywhere in the text (sentencepiece's rev_merge). Merges never cross
   a frozen symbol, nor (bpe_split_space) a non-space character followed by the space symbol, so
   words are merged one at a time, in the same order as sentencepiece's single agenda would. */
typedef struct { int32_t start, len, node, prev, next, frozen; } Sym; /* node: trie node of its bytes */
typedef struct { int32_t key, node; } Pair;                           /* node -1: not a piece */
typedef struct { int32_t key, left, right, size, node; } Entry;       /* an agenda entry */

/* The 0.2.3 wheel orders pair scores by the IEEE total order (-0.0 below +0.0, as its outputs
   show; the published source compares floats, where they tie), which on non-NaN floats is the
   integer order of this key. */
static inline int32_t score_key(float f) {
    int32_t b;
    memcpy(&b, &f, sizeof b);
    return b < 0 ? b ^ 0x7FFFFFFF : b;
}

typedef struct {
    Buf text;
    Best *best;               /* Unigram: the lattice's best paths */
    int32_t *path;
    int64_t best_cap;
    int32_t *ids;             /* the ids of the text last encoded */
    int64_t ids_cap;
    Sym *sym;                 /* BPE: symbols, pairs (small segments), the agenda */
    Pair *pair;
    Entry *heap;
    int64_t sym_cap;
    int32_t *rev;             /* per UNUSED piece: bytes of the left part of its last pair (0: none) */
} Work;

static void work_free(Work *w) {
    free(w->text.p); free(w->best); free(w->path); free(w->ids);
    free(w->sym); free(w->pair); free(w->heap); free(w->rev);
}

static int grow(void **p, int64_t *cap, int64_t need, size_t item) {
    if (need <= *cap) return 0;
    void *q = realloc(*p, need * item);
    if (!q) return -1;
    *p = q;
    *cap = need;
    return 0;
}

static int work_reserve(Work *w, int64_t n) {
    if (n + 1 <= w->best_cap) return 0;
    free(w->best);
    free(w->path);
    w->best = malloc((n + 1) * sizeof(Best));
    w->path = malloc((n + 1) * sizeof(int32_t));
    w->best_cap = w->best && w->path ? n + 1 : 0;
    return w->best_cap ? 0 : -1;
}

static int bpe_reserve(const Model *m, Work *w, int64_t n) {
    if (!w->rev && m->n_unused && !(w->rev = malloc(m->n_unused * sizeof(int32_t)))) return -1;
    if (n <= w->sym_cap) return 0;
    free(w->sym); free(w->pair); free(w->heap);
    w->sym = malloc(n * sizeof(Sym));
    w->pair = malloc(n * sizeof(Pair));
    w->heap = malloc(3 * n * sizeof(Entry)); /* n - 1 first pairs, then at most 2 per merge */
    w->sym_cap = w->sym && w->pair && w->heap ? n : 0;
    return w->sym_cap ? 0 : -1;
}

/* The trie node reached from node `at` over s[0:len), or -1. */
static inline int32_t trie_walk(const DaNode *nodes, int32_t at, const uint8_t *s, int32_t len) {
    if (at < 0) return -1;
    for (int32_t k = 0; k < len; k++) {
        int32_t next = nodes[at].base + s[k];
        if (nodes[next].check != at) return -1;
        at = next;
    }
    return at;
}

static inline int32_t node_value(const DaNode *nodes, int32_t node) { return node < 0 ? -1 : nodes[node].value; }

typedef struct { int32_t *ids; int64_t n; int prev_unk; } Out;

/* Emits one final piece (value: its trie value, -1 for none): an unknown one as its bytes' pieces
   with byte fallback, else as the unknown id, once per run (sentencepiece_processor.cc). An UNUSED
   piece left whole (one character: longer ones always come from a pair) is unknown too: so the 0.2.3 wheel
   encodes, though the newest bpe_model.cc source would emit its id. */
static inline void put_piece(const Model *m, Out *o, const uint8_t *s, int32_t start, int32_t len, int32_t value) {
    if (value >= 0 && !(value & UNUSED_FLAG)) { o->ids[o->n++] = value; o->prev_unk = 0; return; }
    if (m->byte_fallback)
        for (int32_t j = 0; j < len; j++) o->ids[o->n++] = m->byte_ids[s[start + j]];
    else if (!o->prev_unk)
        o->ids[o->n++] = m->unk_id;
    o->prev_unk = 1;
}

static inline Pair pair_of(const DaNode *nodes, const uint8_t *s, const Sym *a, const Sym *b) {
    int32_t node = trie_walk(nodes, a->node, s + b->start, b->len);
    if (node_value(nodes, node) < 0) return (Pair){0, -1};
    return (Pair){score_key(nodes[node].score), node};
}

/* Merges a short segment sym[0:k) (no frozen symbol) by scanning its pairs; the new count. */
static int32_t bpe_small(const DaNode *nodes, const uint8_t *s, Sym *sym, Pair *pair, int32_t k) {
    for (int32_t i = 0; i + 1 < k; i++) pair[i] = pair_of(nodes, s, &sym[i], &sym[i + 1]);
    while (k > 1) {
        int32_t best = -1, key = 0;
        for (int32_t i = 0; i + 1 < k; i++) /* strictly higher: the leftmost wins ties */
            if (pair[i].node >= 0 && (best < 0 || pair[i].key > key)) { best = i; key = pair[i].key; }
        if (best < 0) break;
        sym[best].len += sym[best + 1].len;
        sym[best].node = pair[best].node;
        memmove(&sym[best + 1], &sym[best + 2], (k - best - 2) * sizeof(Sym));
        memmove(&pair[best], &pair[best + 1], (k - best - 2) * sizeof(Pair));
        k--;
        if (best > 0) pair[best - 1] = pair_of(nodes, s, &sym[best - 1], &sym[best]);
        if (best + 1 < k) pair[best] = pair_of(nodes, s, &sym[best], &sym[best + 1]);
    }
    return k;
}

/* Agenda order: higher score first, then the leftmost. Stale entries are skipped when popped,
   and two live entries never compare equal, so any heap pops sentencepiece's order. */
static inline int entry_first(const Entry *a, const Entry *b) {
    return a->key > b->key || (a->key == b->key && a->left < b->left);
}

static void heap_push(Entry *h, int64_t *n, Entry e) {
    int64_t i = (*n)++;
    while (i > 0) {
        int64_t p = (i - 1) / 2;
        if (!entry_first(&e, &h[p])) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = e;
}

static Entry heap_pop(Entry *h, int64_t *n) {
    Entry top = h[0], last = h[--*n];
    int64_t i = 0, size = *n;
    for (;;) {
        int64_t c = 2 * i + 1;
        if (c >= size) break;
        if (c + 1 < size && entry_first(&h[c + 1], &h[c])) c++;
        if (!entry_first(&h[c], &last)) break;
        h[i] = h[c];
        i = c;
    }
    h[i] = last;
    return top;
}

/* MaybeAddNewSymbolPair: the pair of symbols l and r enters the agenda if it forms a piece. */
static inline void bpe_push(const Model *m, Work *w, const uint8_t *s, int64_t *size, int32_t l, int32_t r) {
    if (l < 0 || r < 0) return;
    const Sym *a = &w->sym[l], *b = &w->sym[r];
    if (a->frozen || b->frozen) return;
    const DaNode *nodes = m->pieces.nodes;
    int32_t node = trie_walk(nodes, a->node, s + b->start, b->len);
    int32_t value = node_value(nodes, node);
    if (value < 0) return;
    heap_push(w->heap, size, (Entry){score_key(nodes[node].score), l, r, a->len + b->len, node});
    if (value & UNUSED_FLAG) w->rev[m->unused_slot[value & ID_MASK]] = a->len;
}

/* Merges sym[0:k) with the agenda; the result is the list from sym[0] along next. */
static void bpe_agenda(const Model *m, Work *w, const uint8_t *s, int32_t k) {
    Sym *sym = w->sym;
    for (int32_t i = 0; i < k; i++) { sym[i].prev = i - 1; sym[i].next = i + 1 < k ? i + 1 : -1; }
    int64_t size = 0;
    for (int32_t i = 1; i < k; i++) bpe_push(m, w, s, &size, i - 1, i);
    while (size > 0) {
        Entry top = heap_pop(w->heap, &size);
        Sym *l = &sym[top.left], *r = &sym[top.right];
        if (l->len == 0 || r->len == 0 || l->len + r->len != top.size) continue; /* stale */
        l->len += r->len;
        l->node = top.node;
        l->next = r->next;
        if (r->next >= 0) sym[r->next].prev = top.left;
        r->len = 0;
        bpe_push(m, w, s, &size, l->prev, top.left);
        bpe_push(m, w, s, &size, top.left, l->next);
    }
}

/* Emits s[start:start+len), split back into its last pair's parts while it is an UNUSED piece. */
static void bpe_resegment(const Model *m, const Work *w, const uint8_t *s, int32_t start, int32_t len,
                          int32_t value, Out *o) {
    int32_t left = value >= 0 && (value & UNUSED_FLAG) ? w->rev[m->unused_slot[value & ID_MASK]] : 0;
    if (!left) { put_piece(m, o, s, start, len, value); return; }
    const DaNode *nodes = m->pieces.nodes;
    bpe_resegment(m, w, s, start, left, node_value(nodes, trie_walk(nodes, 0, s + start, left)), o);
    bpe_resegment(m, w, s, start + left, len - left,
                  node_value(nodes, trie_walk(nodes, 0, s + start + left, len - left)), o);
}

/* Merges and emits the segment sym[0:k). */
static void bpe_segment(const Model *m, Work *w, const uint8_t *s, int32_t k, Out *o) {
    const DaNode *nodes = m->pieces.nodes;
    Sym *sym = w->sym;
    if (k <= 48) { /* a word: scanning its few pairs beats a heap */
        k = bpe_small(nodes, s, sym, w->pair, k);
        for (int32_t i = 0; i < k; i++) put_piece(m, o, s, sym[i].start, sym[i].len, node_value(nodes, sym[i].node));
        return;
    }
    bpe_agenda(m, w, s, k);
    for (int32_t i = 0; i >= 0; i = sym[i].next) put_piece(m, o, s, sym[i].start, sym[i].len, node_value(nodes, sym[i].node));
}

/* BPE ids of the normalized text s[0:n) into o (room for n ids: at most one per byte). */
static void bpe_encode(const Model *m, Work *w, const uint8_t *s, int64_t n, Out *o) {
    const DaNode *nodes = m->pieces.nodes;
    const uint8_t space0 = m->escape_whitespaces ? SPACE_SYMBOL[0] : ' ';
    const int32_t space_len = m->escape_whitespaces ? 3 : 1;
    Sym *sym = w->sym;
    int32_t k = 0;
    int prev_space = 0;
    if (m->bpe_whole) memset(w->rev, 0, m->n_unused * sizeof(int32_t));
    for (int64_t pos = 0; pos < n;) {
        int32_t len = 0, frozen = 0, node;
        if (m->user_start[s[pos]]) len = (int32_t)trie_longest(&m->user, s + pos, n - pos, &node);
        if (len) frozen = 1;
        else {
            len = char_len(s[pos]);
            if (len > n - pos) len = (int32_t)(n - pos);
        }
        node = trie_walk(nodes, 0, s + pos, len);
        if (!m->bpe_whole) {
            int space = m->bpe_split_space && s[pos] == space0 && len == space_len &&
                        (space_len == 1 || !memcmp(s + pos, SPACE_SYMBOL, 3));
            if (k > 0 && (frozen || (space && !prev_space))) { bpe_segment(m, w, s, k, o); k = 0; }
            prev_space = space;
            if (frozen) { put_piece(m, o, s, (int32_t)pos, len, node_value(nodes, node)); pos += len; continue; }
        }
        sym[k++] = (Sym){(int32_t)pos, len, node, 0, 0, frozen};
        pos += len;
    }
    if (k == 0) return;
    if (!m->bpe_whole) { bpe_segment(m, w, s, k, o); return; }
    bpe_agenda(m, w, s, k);
    for (int32_t i = 0; i >= 0; i = sym[i].next)
        bpe_resegment(m, w, s, sym[i].start, sym[i].len, node_value(nodes, sym[i].node), o);
}

/* Encodes text[0:len) (valid UTF-8) into w->ids; returns the count, or -1 out of memory. */
static int64_t encode_with(const Model *m, Work *w, const uint8_t *text, int64_t len) {
    if (len == 0) return 0;
    if (normalize(m, text, len, &w->text)) return -1;
    int64_t n = w->text.n;
    if (n == 0) return 0;
    if (n >= INT32_MAX || grow((void **)&w->ids, &w->ids_cap, n, sizeof(int32_t))) return -1;
    if (m->bpe) {
        if (bpe_reserve(m, w, n)) return -1;
        Out o = {w->ids, 0, 0};
        bpe_encode(m, w, w->text.p, n, &o);
        return o.n;
    }
    if (work_reserve(w, n)) return -1;
    viterbi(m, w->text.p, n, w->best);
    return emit(m, w->text.p, n, w->best, w->path, w->ids, n); /* at most one id per byte */
}

/* Encodes text[0:len); the ids go to out[0:cap), their count to *count. Returns 0, 1 when cap was
   too small (then *count is the size needed), -1 out of memory. */
int spm_encode(const void *model, const char *text, int64_t len, int32_t *out, int64_t cap,
               int64_t *count) {
    Work w = {0};
    int64_t c = encode_with(model, &w, (const uint8_t *)text, len);
    *count = c < 0 ? 0 : c;
    if (c > 0) memcpy(out, w.ids, (c < cap ? c : cap) * sizeof(int32_t));
    work_free(&w);
    return c < 0 ? -1 : c > cap;
}

/* Encodes texts[offsets[i]:offsets[i+1]) for i < n in parallel; counts[i] gets each count and
   *results an array of n id arrays, which spm_batch_take copies out (and frees). 0 or -1. */
int spm_encode_batch(const void *model, const char *texts, const int64_t *offsets, int64_t n,
                     int64_t *counts, void **results) {
    const Model *m = model;
    int32_t **ids = calloc(n > 0 ? n : 1, sizeof(int32_t *));
    if (!ids) return -1;
    int failed = 0;
    #pragma omp parallel if (n > 1)
    {
        Work w = {0};
        #pragma omp for schedule(dynamic, 4)
        for (int64_t i = 0; i < n; i++) {
            int64_t c = encode_with(m, &w, (const uint8_t *)texts + offsets[i], offsets[i + 1] - offsets[i]);
            counts[i] = c < 0 ? 0 : c;
            if (c > 0 && (ids[i] = malloc(c * sizeof(int32_t)))) memcpy(ids[i], w.ids, c * sizeof(int32_t));
            else if (c != 0) {
                #pragma omp atomic write
                failed = 1;
            }
        }
        work_free(&w);
    }
    if (failed) {
        for (int64_t i = 0; i < n; i++) free(ids[i]);
        free(ids);
        return -1;
    }
    *results = ids;
    return 0;
}

int spm_batch_take(void *results, const int64_t *counts, int64_t n, int32_t *out) {
    int32_t **ids = results;
    for (int64_t i = 0; i < n; i++) {
        if (counts[i]) memcpy(out, ids[i], counts[i] * sizeof(int32_t));
        out += counts[i];
        free(ids[i]);
    }
    free(ids);
    return 0;
}

/* A model from n pieces (UTF-8 bytes piece_bytes[offsets[i]:offsets[i+1]], scores, types), the
   character map blob (cmap_len 0: none), byte_ids (the <0xXX> piece of each byte, or NULL without
   byte fallback), the normalizer flags and the model type (bpe 0: Unigram). *out gets the handle;
   returns 0 or -1. */
int spm_create(const char *piece_bytes, const int64_t *offsets, const float *scores,
               const int32_t *types, int32_t n, const char *cmap, int64_t cmap_len,
               const int32_t *byte_ids, int32_t unk_id, int32_t add_dummy_prefix,
               int32_t remove_extra_whitespaces, int32_t escape_whitespaces, int32_t bpe, void **out) {
    Model *m = calloc(1, sizeof(Model));
    Key *keys = malloc((n > 0 ? n : 1) * sizeof(Key));
    if (!m || !keys) goto fail;
    m->unk_id = unk_id;
    m->add_dummy_prefix = add_dummy_prefix;
    m->remove_extra_whitespaces = remove_extra_whitespaces;
    m->escape_whitespaces = escape_whitespaces;
    m->byte_fallback = byte_ids != NULL;
    if (byte_ids) memcpy(m->byte_ids, byte_ids, sizeof(m->byte_ids));
    m->min_score = FLT_MAX; /* over NORMAL pieces */
    for (int32_t i = 0; i < n; i++)
        if (types[i] == NORMAL && scores[i] < m->min_score) m->min_score = scores[i];
    m->unk_score = m->min_score - 10.0f; /* kUnkPenalty */

    int32_t k = 0;
    m->bpe = bpe;
    if (bpe) {
        m->unused_slot = malloc((n > 0 ? n : 1) * sizeof(int32_t));
        if (!m->unused_slot) goto fail;
        m->bpe_split_space = 1;
        const uint8_t *space = escape_whitespaces ? SPACE_SYMBOL : (const uint8_t *)" ";
        int32_t space_len = escape_whitespaces ? 3 : 1;
        for (int32_t i = 0; i < n; i++) {
            const uint8_t *p = (const uint8_t *)piece_bytes + offsets[i];
            int32_t len = (int32_t)(offsets[i + 1] - offsets[i]);
            m->unused_slot[i] = types[i] == UNUSED ? m->n_unused++ : -1;
            if (types[i] == UNUSED && char_len(p[0]) < len) m->bpe_whole = 1; /* it can be merged */
            if (types[i] == NORMAL) /* a character, then the space symbol: merges may cross words */
                for (int32_t j = 0, prev_space = 1; j < len;) {
                    int32_t c = char_len(p[j]);
                    int is_space = c == space_len && j + c <= len && !memcmp(p + j, space, space_len);
                    if (is_space && !prev_space) m->bpe_split_space = 0;
                    prev_space = is_space;
                    j += c;
                }
            if (types[i] == NORMAL || types[i] == USER_DEFINED || types[i] == UNUSED)
                keys[k++] = (Key){p, len, types[i] == UNUSED ? i | UNUSED_FLAG : i, scores[i]};
        }
    } else {
        for (int32_t i = 0; i < n; i++)
            if (types[i] == NORMAL || types[i] == USER_DEFINED)
                keys[k++] = (Key){(const uint8_t *)piece_bytes + offsets[i], (int32_t)(offsets[i + 1] - offsets[i]),
                                  types[i] == USER_DEFINED ? i | USER_FLAG : i, scores[i]};
    }
    if (trie_build(&m->pieces, keys, k)) goto fail;
    k = 0;
    for (int32_t i = 0; i < n; i++)
        if (types[i] == USER_DEFINED)
            keys[k++] = (Key){(const uint8_t *)piece_bytes + offsets[i], (int32_t)(offsets[i + 1] - offsets[i]), i, 0.0f};
    if (k) {
        if (trie_build(&m->user, keys, k)) goto fail;
        for (int32_t i = 0; i < k; i++) m->may_start[keys[i].key[0]] = m->user_start[keys[i].key[0]] = 1;
    }

    if (cmap_len > 4) {
        uint32_t trie_bytes;
        memcpy(&trie_bytes, cmap, 4);
        m->cmap_units = trie_bytes / 4;
        m->cmap_strings_len = cmap_len - 4 - trie_bytes;
        m->cmap = malloc(m->cmap_units * 4 + 4);
        m->cmap_strings = malloc(m->cmap_strings_len + 1);
        if (!m->cmap || !m->cmap_strings) goto fail;
        memcpy(m->cmap, cmap + 4, m->cmap_units * 4);
        memcpy(m->cmap_strings, cmap + 4 + trie_bytes, m->cmap_strings_len);
        m->cmap_strings[m->cmap_strings_len] = 0;
        for (int c = 0; c < 256; c++) { /* bytes the map's trie has a transition for */
            int64_t node = cmap_offset(m->cmap[0]) ^ c;
            if (node < m->cmap_units && (m->cmap[node] & 0x800000FFu) == (uint32_t)c) m->may_start[c] = 1;
        }
    }
    free(keys);
    *out = m;
    return 0;
fail:
    free(keys);
    spm_free_model(m);
    return -1;
}
