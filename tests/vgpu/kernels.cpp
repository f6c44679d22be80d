// Every kernel of kernels/*.cu compiled for the host, and the launcher that runs one from the
// driver's `void** params`: the arguments are unpacked by the kernel's own C++ signature, each
// pointer is checked against the live allocations of the current context (a const pointee is a
// read, any other a write, for the stream-order checks), and after the launch every written
// allocation's slack is checked for writes past its ends. VGPU_MUTATE=swap:<kernel> (vgpu.h) makes
// every launch of one kernel wrong on purpose.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda_host.h"
#include "vgpu.h"

#include "kernel_sources.inc"  // generated: one #include per kernels/*.cu

namespace vgpu {

void run_block(Dim3 block_index, void (*body)(const void*), const void* arg);

// Two parameter indices, a < b; {-1, -1}: none.
struct Pair {
  int a = -1, b = -1;
};

namespace {

// What `VGPU_MUTATE=swap:<kernel>` exchanges: the first two pointer parameters with one pointee
// type. Const is ignored, so an input can trade places with an output of its type.
template <class T>
using Pointee = std::remove_cv_t<std::remove_pointer_t<T>>;
template <class T, class... A>
constexpr bool kSameTarget[] = {
    (std::is_pointer_v<T> && std::is_pointer_v<A> && std::is_same_v<Pointee<T>, Pointee<A>>)...};

template <class... A>
constexpr Pair swap_pair() {
  if constexpr (sizeof...(A) >= 2) {
    const bool* same[] = {kSameTarget<A, A...>...};  // same[i][j]: parameters i and j match
    for (int i = 0; i < int(sizeof...(A)); ++i)
      for (int j = i + 1; j < int(sizeof...(A)); ++j)
        if (same[i][j]) return {i, j};
  }
  return {};
}

template <class... A>
constexpr Pair swap_pair_of(void (*)(A...)) {
  return swap_pair<A...>();
}

template <class F, class Tuple>
struct Call {
  F f;
  Tuple args;
  static void run(const void* self) {
    const Call* c = static_cast<const Call*>(self);
    std::apply(c->f, c->args);
  }
};

template <class T>
void check_arg(T v, size_t i, const char* name, Stream* s, Allocation** written) {
  if constexpr (std::is_pointer_v<T>) {
    using P = std::remove_pointer_t<T>;
    if (v == nullptr) return;
    char what[160];
    snprintf(what, sizeof what, "kernel `%s` argument %zu", name, i);
    if constexpr (!std::is_void_v<P>)
      if (uintptr_t(v) % alignof(P))
        fail("misaligned pointer", "%s: %p is not aligned to %zu bytes", what, (const void*)v, alignof(P));
    Access a = std::is_const_v<P> ? Access::Read : Access::Write;
    Allocation* al = access(s, v, 0, a, what);
    written[i] = a == Access::Write ? al : nullptr;
  } else {
    written[i] = nullptr;
  }
}

template <class... A, size_t... I>
int launch_with(void (*f)(A...), const char* name, const LaunchShape& sh, Stream* s, void** params,
                bool mutate, std::index_sequence<I...>) {
  if (sizeof...(A) > 0 && params == nullptr) return 1;  // CUDA_ERROR_INVALID_VALUE
  // VGPU_MUTATE=swap:<this kernel>: two operands exchanged, in a copy of the caller's array.
  [[maybe_unused]] void* swapped[sizeof...(A) + 1];
  if constexpr (constexpr Pair p = swap_pair<A...>(); p.a >= 0) {
    if (mutate) {
      std::copy(params, params + sizeof...(A), swapped);
      std::swap(swapped[p.a], swapped[p.b]);
      params = swapped;
      char what[160];
      snprintf(what, sizeof what, "arguments %d and %d of every `%s` launch swapped", p.a, p.b,
               name);
      mutation_applied(what);
    }
  }
  using Args = std::tuple<std::remove_cv_t<A>...>;
  using C = Call<void (*)(A...), Args>;
  // The arguments are read now, as the driver does; under capture they are kept for every launch
  // of the graph.
  auto call = std::make_shared<const C>(C{f, Args{*static_cast<std::remove_cv_t<A>*>(params[I])...}});
  auto run = [call, name, sh](Stream* s) -> int {
    begin_op(s);
    Allocation* written[sizeof...(A) + 1] = {};
    (check_arg(std::get<I>(call->args), I, name, s, written), ...);
    const Dim3 grid{sh.grid[0], sh.grid[1], sh.grid[2]};
    const Dim3 block{sh.block[0], sh.block[1], sh.block[2]};
    const size_t blocks = size_t(grid.x) * grid.y * grid.z;
    parallel(blocks, [&](size_t b) {
      vgpu_dev::grid_dim = grid;
      vgpu_dev::block_dim = block;
      Dim3 idx{unsigned(b % grid.x), unsigned((b / grid.x) % grid.y), unsigned(b / (size_t(grid.x) * grid.y))};
      run_block(idx, &C::run, call.get());
    });
    for (size_t i = 0; i < sizeof...(A); ++i)
      if (written[i]) check_slack(written[i], name);
    return 0;
  };
  if (captured(s, run)) return 0;
  return run(s);
}

template <class... A>
int launch_kernel(void (*f)(A...), const char* name, const LaunchShape& sh, Stream* s,
                  void** params, bool mutate) {
  return launch_with(f, name, sh, s, params, mutate, std::index_sequence_for<A...>{});
}

}  // namespace

struct Kernel {
  const char* name;
  int (*launch)(const LaunchShape&, Stream*, void**, bool mutate);
  Pair swap;  // the parameters `VGPU_MUTATE=swap:<name>` exchanges
};

#define VGPU_KERNEL(k)                                      \
  {#k,                                                      \
   [](const LaunchShape& sh, Stream* s, void** p, bool m) { \
     return launch_kernel(&::k, #k, sh, s, p, m);           \
   },                                                       \
   swap_pair_of(&::k)},
static const Kernel kKernels[] = {
#include "kernel_table.inc"  // generated: VGPU_KERNEL(name) for every extern "C" kernel
};

const Kernel* find_kernel(const char* name) {
  for (const Kernel& k : kKernels)
    if (strcmp(k.name, name) == 0) return &k;
  return nullptr;
}


int launch(const Kernel* k, const LaunchShape& shape, Stream* s, void** params) {
  audit_launch(k->name, shape);
  if (skip_compute()) return 0;
  return k->launch(shape, s, params, mutation().swap == k);
}

namespace {
FILE* audit_file() {
  static FILE* f = [] {
    const char* path = getenv("VGPU_LAUNCH_LOG");
    return path && *path ? fopen(path, "a") : nullptr;
  }();
  return f;
}
std::mutex audit_mutex;
}  // namespace

bool skip_compute() {
  static const bool skip = [] {
    const char* v = getenv("VGPU_SKIP_COMPUTE");
    return v && strcmp(v, "1") == 0;
  }();
  return skip;
}

void audit_launch(const char* kernel, const LaunchShape& sh) {
  FILE* f = audit_file();
  if (!f) return;
  std::lock_guard<std::mutex> lk(audit_mutex);
  fprintf(f, "launch %s %u %u %u %u %u %u %u\n", kernel, sh.grid[0], sh.grid[1], sh.grid[2],
          sh.block[0], sh.block[1], sh.block[2], sh.shared);
  fflush(f);
}

void audit_event(const char* what) {
  FILE* f = audit_file();
  if (!f) return;
  std::lock_guard<std::mutex> lk(audit_mutex);
  fprintf(f, "event %s\n", what);
  fflush(f);
}

const Mutation& mutation() {
  static const Mutation m = [] {
    Mutation m;
    const char* v = getenv("VGPU_MUTATE");
    if (!v || !*v) return m;
    if (strcmp(v, "transpose") == 0) {
      m.transpose = true;
    } else if (strncmp(v, "swap:", 5) == 0) {
      const char* name = v + 5;
      m.swap = find_kernel(name);
      if (!m.swap) fail("mutation", "VGPU_MUTATE=%s: no kernel named `%s`", v, name);
      if (m.swap->swap.a < 0)
        fail("mutation", "VGPU_MUTATE=%s: `%s` has no two pointer parameters of one type", v, name);
    } else {
      fail("mutation", "VGPU_MUTATE=%s: expected swap:<kernel> or transpose", v);
    }
    return m;
  }();
  return m;
}

void mutation_applied(const char* what) {
  static std::atomic<bool> told{false};
  if (told.exchange(true)) return;
  fprintf(stderr, "\nvgpu: mutation active: %s\n", what);
  fflush(stderr);
}

}  // namespace vgpu
