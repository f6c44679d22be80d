// Sanitizer controls for scripts/sanitize-emulated.sh: each build plants one known bug in a real
// kernel's run, and the script fails unless the sanitizer reports it. A clean sanitizer run of
// kernels.cpp then means something: the same builds do see these bugs.
//   -DBARLOW_CONTROL_RACE      ThreadSanitizer must report a data race in barlow::block_sum.
//   -DBARLOW_CONTROL_OVERFLOW  AddressSanitizer must report a read one element past an input.
// Neither is part of the checks; the kernels themselves are unchanged.
#include "cuda_host.h"

#ifdef BARLOW_CONTROL_RACE
// Every thread skips the first barrier it reaches. In naive_sum_partial that is block_sum's
// barrier between each thread writing its scratch slot and the tree reading its neighbours' slots:
// the race a missing __syncthreads makes on a GPU. Each thread skips exactly one, so the barriers
// left still line up and nothing hangs.
inline thread_local bool emu_control_skipped = false;
inline void emu_control_sync() {
  if (emu_control_skipped) __syncthreads();
  emu_control_skipped = true;
}
#define __syncthreads emu_control_sync
#endif

#include "bench/naive.cu"

#include <stdio.h>

int main() {
#if defined(BARLOW_CONTROL_RACE)
  const int64_t n = 1001;
  std::vector<float> x(n, 1.f), partials(2, NAN);
  emu_launch({2}, {256}, [&] { naive_sum_partial(x.data(), partials.data(), n); });
  printf("race control ran: partial sums %g + %g (%lld without the race)\n", partials[0],
         partials[1], (long long)n);
#elif defined(BARLOW_CONTROL_OVERFLOW)
  // naive_mul over n elements with `a` one element short: the last thread reads a[n - 1].
  const int64_t n = 129;
  std::vector<float> a(n - 1, 1.f), b(n, 2.f), out(n, NAN);
  emu_launch({3}, {64}, [&] { naive_mul(a.data(), b.data(), out.data(), n); });
  printf("overflow control ran unreported\n");
#else
#error "define BARLOW_CONTROL_RACE or BARLOW_CONTROL_OVERFLOW"
#endif
  return 0;
}
