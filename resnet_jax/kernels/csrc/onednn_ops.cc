// oneDNN convolutions (forward; input and kernel gradients) and OpenMP
// training-mode BatchNorm (forward with batch statistics; backward) as XLA FFI
// custom calls for the CPU backend. Built on first use by resnet_jax/onednn.py.
//
// Layouts are the ones the model already uses: activations NHWC, kernels HWIO,
// float32. oneDNN runs directly on XLA's NHWC buffers (as PyTorch's
// channels_last does); kernels are reordered to and from oneDNN's preferred
// blocked layout on every call (KBs to a few MB, negligible next to the work).
//
// Primitives are created once per (operation, shape, stride, padding) and kept
// in a process-wide cache. XLA calls them from whichever of its threads runs
// the op, not the one that created them, so their scratchpads are ours to
// give (scratchpad_mode::user): oneDNN's default "global" scratchpad belongs
// to the creating thread and is too small or missing on another, where an
// im2col convolution then writes past it (seen as a segfault in im2col_dt).

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

// Guards the convolution cache.
std::mutex cache_mu;
// XLA may run independent custom calls on two of its threads at once; each
// would start an OpenMP team over all cores. One oneDNN call at a time keeps
// the cores to one team (measured: ~5% faster train step on 2 cores).
std::mutex run_mu;

// Runs f under run_mu; oneDNN errors become FFI errors (a Python exception).
template <typename F>
ffi::Error Guarded(F&& f) {
  std::lock_guard<std::mutex> run_lock(run_mu);
  try {
    f();
  } catch (const dnnl::error& err) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN failed: ") + err.what());
  }
  return ffi::Error::Success();
}

memory Wrap(const memory::desc& md, void* data) { return memory(md, Engine(), data); }

// Primitive attributes: we pass the scratchpad (see the top of this file).
dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// One scratchpad buffer for every primitive, grown as needed. Only used under
// run_mu, so by one call at a time.
void* scratch_buffer = nullptr;
size_t scratch_capacity = 0;

// Makes the buffer hold at least `bytes` (a reallocation invalidates earlier
// Scratchpad() memories, so reserve before making them).
void ReserveScratchpad(size_t bytes) {
  if (bytes <= scratch_capacity) return;
  std::free(scratch_buffer);
  scratch_capacity = (bytes + 4095) / 4096 * 4096;
  scratch_buffer = std::aligned_alloc(4096, scratch_capacity);
  if (scratch_buffer == nullptr) {
    scratch_capacity = 0;
    throw dnnl::error(dnnl_out_of_memory, "cannot allocate the convolution scratchpad");
  }
}

memory Scratchpad(const memory::desc& md) {
  ReserveScratchpad(md.get_size());
  return Wrap(md, scratch_buffer);
}

// ---- Convolution ------------------------------------------------------------

struct Geometry {
  char kind;                // 'f' forward, 'd' input gradient, 'w' kernel gradient
  int64_t n, h, w, c;       // input NHWC
  int64_t kh, kw, o;        // kernel HWIO (I == c)
  int64_t ho, wo;           // output spatial size
  int64_t sh, sw, pt, pb, pl, pr;

  std::string Key() const {
    std::string k(1, kind);
    for (int64_t v : {n, h, w, c, kh, kw, o, ho, wo, sh, sw, pt, pb, pl, pr}) {
      k += ',';
      k += std::to_string(v);
    }
    return k;
  }
  memory::desc Src() const { return memory::desc({n, c, h, w}, dt::f32, tag::nhwc); }
  memory::desc Dst() const { return memory::desc({n, o, ho, wo}, dt::f32, tag::nhwc); }
  memory::desc Wei(tag t = tag::hwio) const { return memory::desc({o, c, kh, kw}, dt::f32, t); }
};

// One cached convolution: the primitive, its kernel layout, and the reorder
// between that layout and HWIO (none when oneDNN already wants HWIO).
struct ConvEntry {
  dnnl::primitive conv;
  memory::desc wei_md, scratch_md;
  bool needs_reorder = false;
  dnnl::reorder reorder;
  memory::desc reorder_scratch_md;
};

std::shared_ptr<ConvEntry> MakeConv(const Geometry& g) {
  const memory::dims strides = {g.sh, g.sw}, pad_l = {g.pt, g.pl}, pad_r = {g.pb, g.pr};
  const auto direct = dnnl::algorithm::convolution_direct;
  const dnnl::primitive_attr attr = UserScratchpad();
  auto e = std::make_shared<ConvEntry>();
  auto fwd = dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, direct, g.Src(), g.Wei(tag::any), g.Dst(),
      strides, pad_l, pad_r, attr);
  if (g.kind == 'f') {
    e->conv = dnnl::convolution_forward(fwd);
    e->wei_md = fwd.weights_desc();
    e->scratch_md = fwd.scratchpad_desc();
  } else if (g.kind == 'd') {
    auto pd = dnnl::convolution_backward_data::primitive_desc(
        Engine(), direct, g.Src(), g.Wei(tag::any), g.Dst(), strides, pad_l, pad_r, fwd, attr);
    e->conv = dnnl::convolution_backward_data(pd);
    e->wei_md = pd.weights_desc();
    e->scratch_md = pd.scratchpad_desc();
  } else {
    auto pd = dnnl::convolution_backward_weights::primitive_desc(
        Engine(), direct, g.Src(), g.Wei(tag::any), g.Dst(), strides, pad_l, pad_r, fwd, attr);
    e->conv = dnnl::convolution_backward_weights(pd);
    e->wei_md = pd.diff_weights_desc();
    e->scratch_md = pd.scratchpad_desc();
  }
  e->needs_reorder = e->wei_md != g.Wei();
  if (e->needs_reorder) {
    const bool out = g.kind == 'w';  // the kernel gradient leaves oneDNN's layout
    auto pd = dnnl::reorder::primitive_desc(
        Engine(), out ? e->wei_md : g.Wei(), Engine(), out ? g.Wei() : e->wei_md, attr);
    e->reorder = dnnl::reorder(pd);
    e->reorder_scratch_md = pd.scratchpad_desc();
  }
  return e;
}

// The convolution for g, made the first time it is asked for.
std::shared_ptr<ConvEntry> CachedConv(const Geometry& g) {
  static auto* cache = new std::unordered_map<std::string, std::shared_ptr<ConvEntry>>();
  const std::string key = g.Key();
  {
    std::lock_guard<std::mutex> lock(cache_mu);
    auto it = cache->find(key);
    if (it != cache->end()) return it->second;
  }
  auto value = MakeConv(g);
  std::lock_guard<std::mutex> lock(cache_mu);
  return cache->emplace(key, value).first->second;
}

// 'f': dst = conv(src, wei).  'd': src = input gradient, dst holds dy.
// 'w': wei = kernel gradient, dst holds dy.
void RunConv(const Geometry& g, void* src, void* wei, void* dst) {
  auto e = CachedConv(g);
  dnnl::stream stream(Engine());
  memory src_m = Wrap(g.Src(), src), dst_m = Wrap(g.Dst(), dst), user_w = Wrap(g.Wei(), wei);
  memory wei_m = e->needs_reorder ? memory(e->wei_md, Engine()) : user_w;
  auto reorder = [&](memory& from, memory& to) {
    e->reorder.execute(stream, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to},
                                {DNNL_ARG_SCRATCHPAD, Scratchpad(e->reorder_scratch_md)}});
    stream.wait();  // the next primitive may use the same scratchpad buffer
  };
  ReserveScratchpad(std::max(e->scratch_md.get_size(), e->reorder_scratch_md.get_size()));
  const memory scratch = Scratchpad(e->scratch_md);
  if (g.kind == 'f') {
    if (e->needs_reorder) reorder(user_w, wei_m);
    e->conv.execute(stream, {{DNNL_ARG_SRC, src_m}, {DNNL_ARG_WEIGHTS, wei_m}, {DNNL_ARG_DST, dst_m},
                             {DNNL_ARG_SCRATCHPAD, scratch}});
  } else if (g.kind == 'd') {
    if (e->needs_reorder) reorder(user_w, wei_m);
    e->conv.execute(stream, {{DNNL_ARG_DIFF_SRC, src_m}, {DNNL_ARG_WEIGHTS, wei_m},
                             {DNNL_ARG_DIFF_DST, dst_m}, {DNNL_ARG_SCRATCHPAD, scratch}});
  } else {
    e->conv.execute(stream, {{DNNL_ARG_SRC, src_m}, {DNNL_ARG_DIFF_WEIGHTS, wei_m},
                             {DNNL_ARG_DIFF_DST, dst_m}, {DNNL_ARG_SCRATCHPAD, scratch}});
    stream.wait();
    if (e->needs_reorder) reorder(wei_m, user_w);
  }
  stream.wait();
}

Geometry MakeGeometry(char kind, ffi::Span<const int64_t> x, ffi::Span<const int64_t> k,
                      ffi::Span<const int64_t> y, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                      int64_t pl, int64_t pr) {
  return Geometry{kind, x[0], x[1], x[2], x[3], k[0], k[1], k[3], y[1], y[2],
                  sh, sw, pt, pb, pl, pr};
}

ffi::Error ConvFwdImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k, ffi::ResultBuffer<ffi::F32> y,
                       int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  auto g = MakeGeometry('f', x.dimensions(), k.dimensions(), y->dimensions(), sh, sw, pt, pb, pl, pr);
  return Guarded([&] { RunConv(g, x.untyped_data(), k.untyped_data(), y->untyped_data()); });
}

// Both gradients in one call: as two calls, XLA runs them concurrently and two
// OpenMP teams fight over the same cores.
ffi::Error ConvBwdImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> dy,
                       ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dk, int64_t sh,
                       int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  auto g = MakeGeometry('d', x.dimensions(), k.dimensions(), dy.dimensions(), sh, sw, pt, pb, pl, pr);
  return Guarded([&] {
    RunConv(g, dx->untyped_data(), k.untyped_data(), dy.untyped_data());
    g.kind = 'w';
    RunConv(g, x.untyped_data(), dk->untyped_data(), dy.untyped_data());
  });
}

// ---- BatchNorm (training mode: statistics of the batch) ---------------------
//
// Own OpenMP loops rather than oneDNN's BatchNorm: oneDNN accumulates its
// per-channel sums in float32, which made ResNet-20's gradients differ from a
// float64 reference by 8e-4 (relative norm; XLA: 6e-7, PyTorch: 3e-4). These
// loops accumulate in float64 and are memory-bound like oneDNN's.
// Rows are the N*H*W positions of an NHWC tensor, channels are contiguous.

// Per-channel float64 sums over rows of f(row pointers), summed over threads in
// a fixed order (deterministic for a given thread count).
template <int K, typename F>
void ChannelSums(int64_t rows, int64_t c, F f, double* out /* K*c */) {
  const int threads = omp_get_max_threads();
  std::vector<double> partial(static_cast<size_t>(threads) * K * c, 0.0);
#pragma omp parallel num_threads(threads)
  {
    double* acc = partial.data() + static_cast<size_t>(omp_get_thread_num()) * K * c;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) f(r, acc);
  }
  std::fill(out, out + K * c, 0.0);
  for (int t = 0; t < threads; ++t)
    for (int64_t i = 0; i < K * c; ++i) out[i] += partial[static_cast<size_t>(t) * K * c + i];
}

// y = scale * (x - mean) / sqrt(var + eps) + shift; returns the batch mean and
// biased variance per channel (for the running averages).
ffi::Error BnFwdImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> shift,
                     ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> mean_out,
                     ffi::ResultBuffer<ffi::F32> var_out, float eps) {
  std::lock_guard<std::mutex> run_lock(run_mu);
  const auto d = x.dimensions();
  const int64_t c = d[3], rows = d[0] * d[1] * d[2];
  const float* xp = x.typed_data();
  // Shifted sums (by the first row) keep E[x^2] - E[x]^2 accurate for large means.
  std::vector<float> x0(xp, xp + c);
  std::vector<double> sums(2 * c);
  ChannelSums<2>(rows, c, [&](int64_t r, double* acc) {
    const float* row = xp + r * c;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) {
      const double v = static_cast<double>(row[j]) - x0[j];
      acc[j] += v;
      acc[c + j] += v * v;
    }
  }, sums.data());
  std::vector<float> mean(c), a(c), b(c);
  for (int64_t j = 0; j < c; ++j) {
    const double m = sums[j] / rows;
    const double var = std::max(sums[c + j] / rows - m * m, 0.0);
    mean[j] = static_cast<float>(m + x0[j]);
    mean_out->typed_data()[j] = mean[j];
    var_out->typed_data()[j] = static_cast<float>(var);
    a[j] = static_cast<float>(scale.typed_data()[j] / std::sqrt(var + eps));
    b[j] = shift.typed_data()[j];
  }
  float* yp = y->typed_data();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = xp + r * c;
    float* out = yp + r * c;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) out[j] = (row[j] - mean[j]) * a[j] + b[j];
  }
  return ffi::Error::Success();
}

ffi::Error BnBwdImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> mean_in,
                     ffi::Buffer<ffi::F32> var_in, ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dx,
                     ffi::ResultBuffer<ffi::F32> dscale, ffi::ResultBuffer<ffi::F32> dshift, float eps) {
  std::lock_guard<std::mutex> run_lock(run_mu);
  const auto d = x.dimensions();
  const int64_t c = d[3], rows = d[0] * d[1] * d[2];
  const float *xp = x.typed_data(), *dyp = dy.typed_data(), *mean = mean_in.typed_data();
  std::vector<double> sums(2 * c);  // sum dy, sum dy * (x - mean)
  ChannelSums<2>(rows, c, [&](int64_t r, double* acc) {
    const float* xr = xp + r * c;
    const float* gr = dyp + r * c;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) {
      const double g = gr[j];
      acc[j] += g;
      acc[c + j] += g * (static_cast<double>(xr[j]) - mean[j]);
    }
  }, sums.data());
  // dx = scale * inv_std * (dy - mean(dy) - (x - mean) * inv_std^2 * mean(dy * (x - mean)))
  std::vector<float> k1(c), k2(c), k3(c);
  for (int64_t j = 0; j < c; ++j) {
    const double inv_std = 1.0 / std::sqrt(static_cast<double>(var_in.typed_data()[j]) + eps);
    const double g = scale.typed_data()[j] * inv_std;
    dshift->typed_data()[j] = static_cast<float>(sums[j]);
    dscale->typed_data()[j] = static_cast<float>(sums[c + j] * inv_std);
    k1[j] = static_cast<float>(g);
    k2[j] = static_cast<float>(g * sums[j] / rows);
    k3[j] = static_cast<float>(g * inv_std * inv_std * sums[c + j] / rows);
  }
  float* dxp = dx->typed_data();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = xp + r * c;
    const float* gr = dyp + r * c;
    float* out = dxp + r * c;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) out[j] = k1[j] * gr[j] - k2[j] - (xr[j] - mean[j]) * k3[j];
  }
  return ffi::Error::Success();
}

}  // namespace

using F32 = ffi::Buffer<ffi::F32>;

#define CONV_ATTRS                                                                    \
  .Attr<int64_t>("sh").Attr<int64_t>("sw").Attr<int64_t>("pt").Attr<int64_t>("pb") \
      .Attr<int64_t>("pl").Attr<int64_t>("pr")

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetJaxConvFwd, ConvFwdImpl,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>() CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetJaxConvBwd, ConvBwdImpl,
                              ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Arg<F32>().Ret<F32>().Ret<F32>()
                                  CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetJaxBnFwd, BnFwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<F32>().Arg<F32>().Arg<F32>()
                                  .Ret<F32>().Ret<F32>().Ret<F32>()
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetJaxBnBwd, BnBwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<F32>()
                                  .Ret<F32>().Ret<F32>().Ret<F32>()
                                  .Attr<float>("eps"));
