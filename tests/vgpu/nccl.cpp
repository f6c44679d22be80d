// The NCCL part of the virtual device: communicators over the virtual devices of one process
// (ranks on threads, or one thread driving several ranks through group calls), and the
// collectives the library uses: all-reduce (sum), all-gather, broadcast.
//
// A collective runs when the last rank has issued it, under the device lock: each rank's send
// buffer is read and its receive buffer written on that rank's stream (so the usual ordering,
// bounds and context checks apply), and afterwards every participating stream has seen what the
// others did before it, as NCCL's kernels synchronize the ranks. Sums are taken in rank order, so
// every rank receives the same bits. A call returns once its collective ran; a rank that waits
// more than VGPU_NCCL_TIMEOUT_S seconds (default 120) for the others is reported, as is a
// mismatched call (another operation, count, type or root than rank 0's) or an unmodelled one.
#include <string.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "vgpu.h"

namespace {

enum ncclResult_t { ncclSuccess = 0, ncclUnhandledCudaError = 1, ncclSystemError = 2,
                    ncclInternalError = 3, ncclInvalidArgument = 4, ncclInvalidUsage = 5 };
enum ncclDataType_t { ncclInt8 = 0, ncclUint8 = 1, ncclInt32 = 2, ncclUint32 = 3, ncclInt64 = 4,
                      ncclUint64 = 5, ncclFloat16 = 6, ncclFloat32 = 7, ncclFloat64 = 8,
                      ncclBfloat16 = 9 };
enum ncclRedOp_t { ncclSum = 0 };
constexpr int kIdBytes = 128;
struct ncclUniqueId { char internal[kIdBytes]; };

size_t type_size(int t) {
  switch (t) {
    case ncclInt8: case ncclUint8: return 1;
    case ncclFloat16: case ncclBfloat16: return 2;
    case ncclInt32: case ncclUint32: case ncclFloat32: return 4;
    case ncclInt64: case ncclUint64: case ncclFloat64: return 8;
    default: return 0;
  }
}

const char* type_name(int t) {
  static const char* names[] = {"int8", "uint8", "int32", "uint32", "int64", "uint64",
                                "float16", "float32", "float64", "bfloat16"};
  return t >= 0 && t <= 9 ? names[t] : "unknown";
}

enum class Kind { AllReduce, AllGather, Broadcast };
const char* kind_name(Kind k) {
  return k == Kind::AllReduce ? "ncclAllReduce" : k == Kind::AllGather ? "ncclAllGather" : "ncclBroadcast";
}

struct Part {
  Kind kind;
  const void* send;
  void* recv;
  size_t count;  // elements sent (all-gather: per rank)
  int type;
  int op;
  int root;
  vgpu::Stream* stream;
};

struct Pending {
  std::vector<std::unique_ptr<Part>> parts;
  int arrived = 0;
  bool done = false;
};

struct Clique;

struct Comm {
  Clique* clique;
  int rank;
  vgpu::Context* ctx;
  uint64_t next = 0;  // sequence number of this rank's next collective
  bool destroyed = false;
};

struct Clique {
  int n;
  std::vector<Comm*> ranks;
  int joined = 0;
  std::map<uint64_t, Pending> pending;
};

// Guards every clique and communicator; taken before the device lock, never inside it.
std::mutex& nccl_mutex() {
  static std::mutex m;
  return m;
}
std::condition_variable& changed() {
  static std::condition_variable c;
  return c;
}
std::map<std::string, Clique*>& cliques() {
  static std::map<std::string, Clique*> c;
  return c;
}

std::chrono::seconds timeout() {
  const char* v = getenv("VGPU_NCCL_TIMEOUT_S");
  long s = v ? atol(v) : 120;
  return std::chrono::seconds(s > 0 ? s : 120);
}

// Calls between ncclGroupStart and the matching ncclGroupEnd, on this thread.
thread_local int group_depth = 0;
struct Issued {
  Clique* clique;
  uint64_t seq;
};
thread_local std::vector<Issued> group_issued;
thread_local std::vector<Clique*> group_inits;

bool live(Comm* c) {
  if (!c || c->destroyed) return false;
  for (auto& [_, k] : cliques())
    for (Comm* r : k->ranks)
      if (r == c) return true;
  return false;
}

// Runs one complete collective. Called with the NCCL mutex held; takes the device lock.
void execute(Pending& p, int n) {
  std::lock_guard<std::recursive_mutex> dev(vgpu::lock());
  const Part& first = *p.parts[0];
  for (int r = 1; r < n; ++r) {
    const Part& q = *p.parts[r];
    if (q.kind != first.kind || q.count != first.count || q.type != first.type ||
        q.op != first.op || q.root != first.root)
      vgpu::fail("nccl", "rank %d called %s(count %zu, %s, root %d) where rank 0 called "
                 "%s(count %zu, %s, root %d): every rank must issue the same collectives in the "
                 "same order", r, kind_name(q.kind), q.count, type_name(q.type), q.root,
                 kind_name(first.kind), first.count, type_name(first.type), first.root);
  }
  size_t es = type_size(first.type);
  size_t in_bytes = first.count * es;
  size_t out_bytes = first.kind == Kind::AllGather ? in_bytes * n : in_bytes;
  // Every rank's input, copied before any output is written (in-place calls alias them).
  std::vector<std::vector<unsigned char>> in(n);
  for (int r = 0; r < n; ++r) {
    const Part& q = *p.parts[r];
    if (first.kind == Kind::Broadcast && r != first.root) continue;
    if (in_bytes) vgpu::access(q.stream, q.send, in_bytes, vgpu::Access::Read, kind_name(q.kind));
    in[r].assign(static_cast<const unsigned char*>(q.send),
                 static_cast<const unsigned char*>(q.send) + in_bytes);
  }
  std::vector<unsigned char> out(out_bytes);
  switch (first.kind) {
    case Kind::AllReduce: {
      memcpy(out.data(), in[0].data(), in_bytes);
      auto sum = [&](auto zero) {
        using T = decltype(zero);
        T* o = reinterpret_cast<T*>(out.data());
        for (int r = 1; r < n; ++r) {
          const T* x = reinterpret_cast<const T*>(in[r].data());
          for (size_t i = 0; i < first.count; ++i) o[i] = T(o[i] + x[i]);
        }
      };
      switch (first.type) {
        case ncclFloat32: sum(0.0f); break;
        case ncclFloat64: sum(0.0); break;
        case ncclInt32: sum(int32_t(0)); break;
        case ncclInt64: sum(int64_t(0)); break;
        case ncclUint8: sum(uint8_t(0)); break;
        default:
          vgpu::fail("nccl", "ncclAllReduce over %s is not modelled by the virtual device",
                     type_name(first.type));
      }
      break;
    }
    case Kind::AllGather:
      for (int r = 0; r < n; ++r) memcpy(out.data() + r * in_bytes, in[r].data(), in_bytes);
      break;
    case Kind::Broadcast:
      memcpy(out.data(), in[first.root].data(), in_bytes);
      break;
  }
  for (int r = 0; r < n; ++r) {
    const Part& q = *p.parts[r];
    if (!out_bytes) continue;
    vgpu::Allocation* a =
        vgpu::access(q.stream, q.recv, out_bytes, vgpu::Access::Write, kind_name(q.kind));
    memcpy(q.recv, out.data(), out_bytes);
    vgpu::check_slack(a, kind_name(q.kind));
  }
  // The collective synchronizes the ranks: each stream has now seen what every other did.
  vgpu::Clock all;
  for (int r = 0; r < n; ++r) all.join(p.parts[r]->stream->clock);
  for (int r = 0; r < n; ++r) p.parts[r]->stream->clock.join(all);
  p.done = true;
}

// Records this rank's part; runs the collective when it completes it.
Issued issue(Comm* c, std::unique_ptr<Part> part) {
  Clique* k = c->clique;
  uint64_t seq = c->next++;
  Pending& p = k->pending[seq];
  if (p.parts.empty()) p.parts.resize(k->n);
  p.parts[c->rank] = std::move(part);
  if (++p.arrived == k->n) {
    execute(p, k->n);
    changed().notify_all();
  }
  return {k, seq};
}

void wait_done(std::unique_lock<std::mutex>& lk, const Issued& i, const char* what) {
  auto deadline = std::chrono::steady_clock::now() + timeout();
  while (!i.clique->pending[i.seq].done) {
    if (changed().wait_until(lk, deadline) == std::cv_status::timeout &&
        !i.clique->pending[i.seq].done)
      vgpu::fail("nccl", "%s waited %llds for the other ranks (a thread that drives several "
                 "ranks must group their calls between ncclGroupStart and ncclGroupEnd)", what,
                 (long long)timeout().count());
  }
  // The last rank to see it done frees it.
  Pending& p = i.clique->pending[i.seq];
  if (--p.arrived == 0) i.clique->pending.erase(i.seq);
}

void wait_joined(std::unique_lock<std::mutex>& lk, Clique* k) {
  auto deadline = std::chrono::steady_clock::now() + timeout();
  while (k->joined < k->n) {
    if (changed().wait_until(lk, deadline) == std::cv_status::timeout && k->joined < k->n)
      vgpu::fail("nccl", "ncclCommInitRank waited %llds for %d of %d ranks to join",
                 (long long)timeout().count(), k->n - k->joined, k->n);
  }
}

ncclResult_t collective(Kind kind, const void* send, void* recv, size_t count, int type, int op,
                        int root, Comm* comm, void* hs) {
  std::unique_lock<std::mutex> lk(nccl_mutex());
  if (!live(comm)) return ncclInvalidArgument;
  if (!send || !recv || !type_size(type) || op != ncclSum || root < 0 || root >= comm->clique->n)
    return ncclInvalidArgument;
  auto part = std::make_unique<Part>(Part{kind, send, recv, count, type, op, root, nullptr});
  {
    std::lock_guard<std::recursive_mutex> dev(vgpu::lock());
    // As NCCL does, the call runs on the communicator's device whatever context is current.
    vgpu::Stream* s = vgpu::stream(hs, comm->ctx);
    if (s->ctx != comm->ctx)
      vgpu::fail("nccl", "%s on rank %d: the stream belongs to another context than the "
                 "communicator's device", kind_name(kind), comm->rank);
    vgpu::no_capture(s, kind_name(kind));
    vgpu::begin_op(s);
    part->stream = s;
  }
  Issued i = issue(comm, std::move(part));
  if (group_depth > 0) {
    group_issued.push_back(i);
    return ncclSuccess;
  }
  wait_done(lk, i, kind_name(kind));
  return ncclSuccess;
}

Clique* clique_for(const ncclUniqueId& id, int n) {
  std::string key(id.internal, kIdBytes);
  Clique*& k = cliques()[key];
  if (!k) {
    k = new Clique;
    k->n = n;
    k->ranks.assign(n, nullptr);
  }
  return k;
}

}  // namespace

#define EXPORT extern "C" __attribute__((visibility("default")))

EXPORT ncclResult_t ncclGetVersion(int* v) {
  if (!v) return ncclInvalidArgument;
  *v = 23000;
  return ncclSuccess;
}

EXPORT ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
  if (!id) return ncclInvalidArgument;
  static std::atomic<unsigned long> counter{0};
  memset(id->internal, 0, kIdBytes);
  snprintf(id->internal, kIdBytes, "vgpu-nccl-%d-%lu", int(getpid()), ++counter);
  return ncclSuccess;
}

EXPORT const char* ncclGetErrorString(ncclResult_t r) {
  switch (r) {
    case ncclSuccess: return "no error";
    case ncclInvalidArgument: return "invalid argument (virtual device)";
    case ncclInvalidUsage: return "invalid usage (virtual device)";
    default: return "error (virtual device)";
  }
}

EXPORT const char* ncclGetLastError(void*) { return ""; }

EXPORT ncclResult_t ncclCommInitRank(Comm** out, int n, ncclUniqueId id, int rank) {
  if (!out || n <= 0 || rank < 0 || rank >= n) return ncclInvalidArgument;
  std::unique_lock<std::mutex> lk(nccl_mutex());
  vgpu::Context* ctx;
  {
    std::lock_guard<std::recursive_mutex> dev(vgpu::lock());
    ctx = vgpu::current();
  }
  if (!ctx) return ncclInvalidUsage;
  Clique* k = clique_for(id, n);
  if (k->n != n || k->ranks[rank]) return ncclInvalidUsage;
  Comm* c = new Comm{k, rank, ctx};
  k->ranks[rank] = c;
  ++k->joined;
  *out = c;
  changed().notify_all();
  if (group_depth > 0) {
    group_inits.push_back(k);
    return ncclSuccess;
  }
  wait_joined(lk, k);
  return ncclSuccess;
}

EXPORT ncclResult_t ncclCommInitAll(Comm** out, int n, const int* devices) {
  if (!out || n <= 0) return ncclInvalidArgument;
  std::lock_guard<std::mutex> lk(nccl_mutex());
  std::vector<vgpu::Context*> ctxs(n);
  {
    std::lock_guard<std::recursive_mutex> dev(vgpu::lock());
    for (int r = 0; r < n; ++r) {
      int d = devices ? devices[r] : r;
      ctxs[r] = vgpu::primary_context(d);
      if (!ctxs[r]) return ncclInvalidArgument;
    }
  }
  ncclUniqueId id;
  ncclGetUniqueId(&id);
  Clique* k = clique_for(id, n);
  for (int r = 0; r < n; ++r) {
    k->ranks[r] = new Comm{k, r, ctxs[r]};
    out[r] = k->ranks[r];
  }
  k->joined = n;
  return ncclSuccess;
}

static ncclResult_t release(Comm* c) {
  std::lock_guard<std::mutex> lk(nccl_mutex());
  if (!live(c)) return ncclInvalidArgument;
  c->destroyed = true;
  Clique* k = c->clique;
  for (Comm* r : k->ranks)
    if (r && !r->destroyed) return ncclSuccess;
  for (auto it = cliques().begin(); it != cliques().end(); ++it)
    if (it->second == k) {
      cliques().erase(it);
      break;
    }
  for (Comm* r : k->ranks) delete r;
  delete k;
  return ncclSuccess;
}

EXPORT ncclResult_t ncclCommDestroy(Comm* c) { return release(c); }
EXPORT ncclResult_t ncclCommAbort(Comm* c) { return release(c); }
EXPORT ncclResult_t ncclCommFinalize(Comm* c) {
  std::lock_guard<std::mutex> lk(nccl_mutex());
  return live(c) ? ncclSuccess : ncclInvalidArgument;
}

EXPORT ncclResult_t ncclCommCount(Comm* c, int* n) {
  std::lock_guard<std::mutex> lk(nccl_mutex());
  if (!live(c) || !n) return ncclInvalidArgument;
  *n = c->clique->n;
  return ncclSuccess;
}

EXPORT ncclResult_t ncclCommUserRank(Comm* c, int* r) {
  std::lock_guard<std::mutex> lk(nccl_mutex());
  if (!live(c) || !r) return ncclInvalidArgument;
  *r = c->rank;
  return ncclSuccess;
}

EXPORT ncclResult_t ncclCommCuDevice(Comm* c, int* d) {
  std::lock_guard<std::mutex> lk(nccl_mutex());
  if (!live(c) || !d) return ncclInvalidArgument;
  *d = c->ctx->device;
  return ncclSuccess;
}

EXPORT ncclResult_t ncclGroupStart() {
  ++group_depth;
  return ncclSuccess;
}

EXPORT ncclResult_t ncclGroupEnd() {
  if (group_depth <= 0) return ncclInvalidUsage;
  if (--group_depth > 0) return ncclSuccess;
  std::unique_lock<std::mutex> lk(nccl_mutex());
  for (Clique* k : group_inits) wait_joined(lk, k);
  group_inits.clear();
  std::vector<Issued> issued;
  issued.swap(group_issued);
  for (const Issued& i : issued) wait_done(lk, i, "ncclGroupEnd");
  return ncclSuccess;
}

EXPORT ncclResult_t ncclAllReduce(const void* send, void* recv, size_t count, int type, int op,
                                  Comm* comm, void* stream) {
  return collective(Kind::AllReduce, send, recv, count, type, op, 0, comm, stream);
}

EXPORT ncclResult_t ncclAllGather(const void* send, void* recv, size_t count, int type, Comm* comm,
                                  void* stream) {
  return collective(Kind::AllGather, send, recv, count, type, ncclSum, 0, comm, stream);
}

EXPORT ncclResult_t ncclBroadcast(const void* send, void* recv, size_t count, int type, int root,
                                  Comm* comm, void* stream) {
  return collective(Kind::Broadcast, send, recv, count, type, ncclSum, root, comm, stream);
}
