// The cuRAND part of the virtual device: only what a framework does when it opens a device
// (create a generator, bind it to a stream, seed it, destroy it). Generating numbers is not
// modelled; those calls are absent, so a program that makes them fails to resolve them.
#include <stdint.h>

#include <mutex>
#include <set>

#include "vgpu.h"

namespace {

enum curandStatus_t { CURAND_STATUS_SUCCESS = 0, CURAND_STATUS_NOT_INITIALIZED = 101,
                      CURAND_STATUS_TYPE_ERROR = 103 };
constexpr int kPseudoDefault = 100;  // CURAND_RNG_PSEUDO_DEFAULT

struct Generator {
  void* stream = nullptr;
  uint64_t seed = 0, offset = 0;
};

std::set<Generator*>& generators() {
  static std::set<Generator*> g;
  return g;
}

bool live(Generator* g) { return g && generators().count(g); }

}  // namespace

#define EXPORT extern "C" __attribute__((visibility("default")))

EXPORT curandStatus_t curandCreateGenerator(Generator** out, int kind) {
  std::lock_guard<std::recursive_mutex> lock(vgpu::lock());
  if (!out) return CURAND_STATUS_NOT_INITIALIZED;
  if (kind != kPseudoDefault) return CURAND_STATUS_TYPE_ERROR;
  *out = new Generator;
  generators().insert(*out);
  return CURAND_STATUS_SUCCESS;
}

EXPORT curandStatus_t curandDestroyGenerator(Generator* g) {
  std::lock_guard<std::recursive_mutex> lock(vgpu::lock());
  if (!live(g)) return CURAND_STATUS_NOT_INITIALIZED;
  generators().erase(g);
  delete g;
  return CURAND_STATUS_SUCCESS;
}

EXPORT curandStatus_t curandSetStream(Generator* g, void* stream) {
  std::lock_guard<std::recursive_mutex> lock(vgpu::lock());
  if (!live(g)) return CURAND_STATUS_NOT_INITIALIZED;
  vgpu::Context* ctx = vgpu::current();
  if (ctx) vgpu::stream(stream, ctx);  // a stream of another context is reported here
  g->stream = stream;
  return CURAND_STATUS_SUCCESS;
}

EXPORT curandStatus_t curandSetPseudoRandomGeneratorSeed(Generator* g, unsigned long long seed) {
  std::lock_guard<std::recursive_mutex> lock(vgpu::lock());
  if (!live(g)) return CURAND_STATUS_NOT_INITIALIZED;
  g->seed = seed;
  return CURAND_STATUS_SUCCESS;
}

EXPORT curandStatus_t curandSetGeneratorOffset(Generator* g, unsigned long long offset) {
  std::lock_guard<std::recursive_mutex> lock(vgpu::lock());
  if (!live(g)) return CURAND_STATUS_NOT_INITIALIZED;
  g->offset = offset;
  return CURAND_STATUS_SUCCESS;
}
