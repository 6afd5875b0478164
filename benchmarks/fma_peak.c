/* fp32 FMA throughput of one core: 12 independent chains of vector FMAs
 * (enough to fill two FMA pipes of 4-cycle latency), nothing else in the loop.
 * Built with -O3 -march=native by benchmarks/throughput.py, one copy per core at
 * once: `fma_peak ITERATIONS CORE` runs on core CORE (Linux; elsewhere CORE only
 * names the copy and the system places it); prints GFLOP/s. The best any fp32 code can do on this core, clock
 * boost included. */
#define _GNU_SOURCE
#include <immintrin.h>
#ifdef __linux__
#include <sched.h>
#endif
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#if defined(__AVX512F__)
typedef __m512 vec;
#define LANES 16
#define SET1 _mm512_set1_ps
#define FMA _mm512_fmadd_ps
#define FIRST(v) _mm512_cvtss_f32(v)
#elif defined(__FMA__)
typedef __m256 vec;
#define LANES 8
#define SET1 _mm256_set1_ps
#define FMA _mm256_fmadd_ps
#define FIRST(v) _mm256_cvtss_f32(v)
#else
#error "needs AVX-512 or AVX2 with FMA"
#endif

#define CHAINS 12

int main(int argc, char **argv) {
    long iterations = argc > 1 ? atol(argv[1]) : 100000000L;
#ifdef __linux__
    if (argc > 2) {
        cpu_set_t cores;
        CPU_ZERO(&cores);
        CPU_SET(atoi(argv[2]), &cores);
        if (sched_setaffinity(0, sizeof cores, &cores)) { perror("sched_setaffinity"); return 1; }
    }
#endif
    vec acc[CHAINS];
    vec b = SET1(0.9999999f), c = SET1(1e-7f);
    for (int i = 0; i < CHAINS; i++) acc[i] = SET1((float)i);
    struct timespec start, end;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (long k = 0; k < iterations; k++)
        for (int i = 0; i < CHAINS; i++) acc[i] = FMA(acc[i], b, c);
    clock_gettime(CLOCK_MONOTONIC, &end);
    double seconds = (end.tv_sec - start.tv_sec) + 1e-9 * (end.tv_nsec - start.tv_nsec);
    float sum = 0;  /* use the results, so the loop is not removed */
    for (int i = 0; i < CHAINS; i++) sum += FIRST(acc[i]);
    printf("%.2f %d %g\n", iterations * (double)CHAINS * LANES * 2 / seconds / 1e9, LANES * 32, sum);
    return 0;
}
