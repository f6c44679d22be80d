// The block scheduler: every thread of a block is a fiber on the worker running the block. A
// thread runs until it reaches `__syncthreads` or returns; the block's threads are resumed in turn,
// so no thread passes a barrier before all live threads have reached it.
//
// On x86-64 a fiber switch saves the callee-saved registers and swaps stacks (a few nanoseconds);
// elsewhere ucontext does it, at the price of a signal-mask system call per switch.
#include <sys/mman.h>
#include <ucontext.h>

#include "cuda_host.h"
#include "vgpu.h"

namespace vgpu_dev {
thread_local constinit Dim3 thread_idx, block_idx, block_dim, grid_dim;
}

namespace vgpu {
namespace {

constexpr size_t kStack = 128 * 1024;
constexpr size_t kPage = 4096;

#if defined(__x86_64__)
extern "C" void vgpu_fiber_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .p2align 4
  .type vgpu_fiber_switch,@function
vgpu_fiber_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size vgpu_fiber_switch,.-vgpu_fiber_switch
)");
struct Fiber {
  void* sp = nullptr;
};
#else
struct Fiber {
  ucontext_t uc;
};
#endif

struct Worker {
  std::vector<Fiber> fibers;
  std::vector<unsigned char> done;
  char* stacks = nullptr;
  Fiber scheduler;
  unsigned current = 0;
  bool direct = false;
  unsigned barriers = 0;
  void (*body)(const void*) = nullptr;
  const void* arg = nullptr;
  // The stacks go with the thread: every stack and its guard page is a mapping of its own, and a
  // process may hold only about 65k (vm.max_map_count), so a program that starts many threads
  // over its life would run out.
  ~Worker();
};

thread_local Worker w;

void to_scheduler() {
#if defined(__x86_64__)
  vgpu_fiber_switch(&w.fibers[w.current].sp, w.scheduler.sp);
#else
  swapcontext(&w.fibers[w.current].uc, &w.scheduler.uc);
#endif
}

void fiber_main() {
  w.body(w.arg);
  w.done[w.current] = 1;
  to_scheduler();  // never resumed again
  fail("host", "a finished fiber was resumed");
}

void reserve() {
  if (w.stacks) return;
  // One stack per possible thread, each with a guard page below it; pages are touched lazily.
  size_t total = size_t(kMaxThreadsPerBlock) * kStack;
  void* m = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) fail("host", "cannot map fiber stacks");
  w.stacks = static_cast<char*>(m);
  for (size_t i = 0; i < size_t(kMaxThreadsPerBlock); ++i) mprotect(w.stacks + i * kStack, kPage, PROT_NONE);
  w.fibers.resize(kMaxThreadsPerBlock);
  w.done.resize(kMaxThreadsPerBlock);
}

Worker::~Worker() {
  if (stacks) munmap(stacks, size_t(kMaxThreadsPerBlock) * kStack);
}

Dim3 index_of(unsigned t) {
  const Dim3& b = vgpu_dev::block_dim;
  return {t % b.x, (t / b.x) % b.y, t / (b.x * b.y)};
}

void start(unsigned t) {
  char* top = w.stacks + (t + 1) * kStack;
#if defined(__x86_64__)
  // As if fiber_main had been called and had pushed six registers: the switch pops them and
  // returns into it with the stack aligned as after a call.
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;
  *--sp = reinterpret_cast<void*>(&fiber_main);
  for (int i = 0; i < 6; ++i) *--sp = nullptr;
  w.fibers[t].sp = sp;
#else
  ucontext_t& f = w.fibers[t].uc;
  getcontext(&f);
  f.uc_stack.ss_sp = top - kStack + kPage;
  f.uc_stack.ss_size = kStack - kPage;
  f.uc_link = nullptr;
  makecontext(&f, fiber_main, 0);
#endif
  w.done[t] = 0;
}

void resume(unsigned t) {
  w.current = t;
  vgpu_dev::thread_idx = index_of(t);
#if defined(__x86_64__)
  vgpu_fiber_switch(&w.scheduler.sp, w.fibers[t].sp);
#else
  swapcontext(&w.scheduler.uc, &w.fibers[t].uc);
#endif
}

}  // namespace

void run_block(Dim3 block_index, void (*body)(const void*), const void* arg) {
  const Dim3& b = vgpu_dev::block_dim;
  const unsigned n = b.x * b.y * b.z;
  reserve();
  vgpu_dev::block_idx = block_index;
  w.body = body;
  w.arg = arg;
  w.barriers = 0;
  start(0);
  resume(0);
  if (w.done[0] && w.barriers == 0) {
    // Barriers are block-uniform, so thread 0 passing none means none is reached on this launch:
    // the other threads run straight through, without fibers.
    w.direct = true;
    for (unsigned t = 1; t < n; ++t) {
      w.current = t;
      vgpu_dev::thread_idx = index_of(t);
      body(arg);
    }
    w.direct = false;
    return;
  }
  for (unsigned t = 1; t < n; ++t) {
    start(t);
    resume(t);
  }
  for (bool live = true; live;) {
    live = false;
    for (unsigned t = 0; t < n; ++t)
      if (!w.done[t]) {
        live = true;
        resume(t);
      }
  }
}

}  // namespace vgpu

void __syncthreads() {
  using vgpu::w;
  if (w.direct)
    vgpu::fail("divergent barrier", "thread %u of block (%u,%u,%u) reached __syncthreads where thread 0 "
               "of its block reached none", w.current, blockIdx.x, blockIdx.y, blockIdx.z);
  ++w.barriers;
  vgpu::to_scheduler();
}
