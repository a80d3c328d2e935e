/* The row kernels' instantiations, shared by int4.c and int8.c: a kernel NAME(a, n0, n1, m0, R, M), inlined with R
 * (weight rows at once: 1, 2 or 4) and M (rows of x: 1..8) as compile-time constants, becomes 24 functions of type
 * FN, FN NAME##_fns[log2 R][M - 1]; ARGS is the kernels' argument struct. */
#ifndef LMFORGE_ROWS_H
#define LMFORGE_ROWS_H

#define ROWS_FN(NAME, ARGS, R, M) \
    static void NAME##_##R##_##M(const ARGS *a, int64_t n0, int64_t n1, int64_t m0) { NAME(a, n0, n1, m0, R, M); }
#define ROWS_FNS(NAME, ARGS, R) \
    ROWS_FN(NAME, ARGS, R, 1) ROWS_FN(NAME, ARGS, R, 2) ROWS_FN(NAME, ARGS, R, 3) ROWS_FN(NAME, ARGS, R, 4) \
    ROWS_FN(NAME, ARGS, R, 5) ROWS_FN(NAME, ARGS, R, 6) ROWS_FN(NAME, ARGS, R, 7) ROWS_FN(NAME, ARGS, R, 8)
#define ROWS_ROW(NAME, R) \
    {NAME##_##R##_1, NAME##_##R##_2, NAME##_##R##_3, NAME##_##R##_4, \
     NAME##_##R##_5, NAME##_##R##_6, NAME##_##R##_7, NAME##_##R##_8}
#define ROWS_TABLE(NAME, ARGS, FN) \
    ROWS_FNS(NAME, ARGS, 1) ROWS_FNS(NAME, ARGS, 2) ROWS_FNS(NAME, ARGS, 4) \
    static const FN NAME##_fns[3][8] = {ROWS_ROW(NAME, 1), ROWS_ROW(NAME, 2), ROWS_ROW(NAME, 4)};

#endif
