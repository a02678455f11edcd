// Attention on (B, H, T, D) q, k, v (causal or not), CPU, fp32/bf16 in and out, fp32 math.
//
// One (batch, head) per task: its rows are converted to fp32 in task-local buffers (k and v
// also transposed, so every inner loop runs over a contiguous dimension), then each query row
// takes an exact softmax over its keys: the row of scores is T floats, in L1 at the T a CPU
// trains at. Causal rows stop at the diagonal (half the work of a masked dense product, which
// is what torch's CPU kernels pay for in bf16). The forward saves the log-sum-exp per row; the
// backward recomputes p from it and accumulates dk/dv in fp32 per task, so results are
// deterministic and do not depend on the thread count. Dropout draws the same keep-mask as the
// Triton kernels (kernels/attention.py): Philox-4x32-10 of tl.rand, keyed by the call's seed and
// the (batch, head), counter query * T + key; the backward regenerates it. Outputs and input gradients are stored
// (B, T, H, D) and returned as (B, H, T, D) views: the model's transpose back to (B, T, C) is free.
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "cpu/glue.h"

// the shapes, tiles and row views the kernels of every clone (attention_kernels.h) take, and the
// glue's tensor helpers
namespace nanogpt_cpu::attn {

struct Shape {
  int64_t T, D;
  bool causal;
  float scale;
  float p_drop;   // dropout probability (0: none)
  uint64_t seed;  // the call's dropout seed
  int64_t keys(int64_t i) const { return causal ? i + 1 : T; }  // query row i sees keys [0, keys(i))
  uint64_t key(int64_t bh) const { return seed + static_cast<uint64_t>(bh) * 2654435769u; }  // as the Triton kernels
};

// Register tiles: RB query rows x W keys (or W head-dim columns) of fp32 accumulators. The task
// buffers are zero-padded to Tp = T and Dp = D rounded up to W, so tiles never need masks.
constexpr int64_t RB = 4, W = 16;
NG_INLINE int64_t round_up(int64_t n) { return (n + W - 1) / W * W; }

// (B, H, T, D) rows of one (b, h): base + t * st, unit stride over D
template <class T>
struct Rows {
  const T* p;
  int64_t st;
  const T* row(int64_t t) const { return p + t * st; }
};

// Rows [i, i + RB) of a task: how many keys their tile covers, and each row's own count (0 past T)
NG_INLINE int64_t tile_keys(const Shape& sh, int64_t i) {
  return round_up(sh.causal ? std::min(i + RB, sh.T) : sh.T);
}
NG_INLINE int64_t row_keys(const Shape& sh, int64_t row) { return row < sh.T ? sh.keys(row) : 0; }

// task buffer sizes in floats (Tp rows of Dp, Dp rows of Tp, RB rows of Tp)
NG_INLINE int64_t fwd_buffer(int64_t Tn, int64_t D) {
  return 3 * round_up(Tn) * round_up(D) + RB * (round_up(Tn) + round_up(D)) + round_up(Tn);
}
NG_INLINE int64_t bwd_buffer(int64_t Tn, int64_t D) {
  return 7 * round_up(Tn) * round_up(D) + RB * (3 * round_up(Tn) + round_up(D)) + round_up(Tn);
}

// t itself when its last dimension has unit stride, else a contiguous copy
at::Tensor unit_stride(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// unit stride over D (a copy otherwise); same (B, H, T, D) shape and dtype as q
at::Tensor checked(const at::Tensor& t, const at::Tensor& q, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.sizes() == q.sizes(), op, ": ", name, " has shape ", t.sizes(), ", expected q's shape ", q.sizes(),
              " (B, H, T, D)");
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " is ", t.scalar_type(), ", expected q's dtype ",
              q.scalar_type());
  return unit_stride(t);
}

void check_q(const at::Tensor& q, const char* op) {
  TORCH_CHECK(q.dim() == 4, op, ": q must be (B, H, T, D), got shape ", q.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, op,
              ": CPU attention takes float32 or bfloat16, got ", q.scalar_type());
}

// (B, H, T, D) view of a new (B, T, H, D) buffer
at::Tensor new_bthd(const at::Tensor& q) {
  return new_output(q, {q.size(0), q.size(2), q.size(1), q.size(3)}, q.scalar_type()).transpose(1, 2);
}

template <class T>
T* head_ptr(const at::Tensor& t, int64_t b, int64_t h) {
  return data<T>(t) + b * t.stride(0) + h * t.stride(1);
}
template <class T>
Rows<T> rows(const at::Tensor& t, int64_t b, int64_t h) {
  return {head_ptr<T>(t, b, h), t.stride(2)};
}

// f(T{}) with the kernels' storage type of q's dtype (checked by check_q)
template <class F>
void with_dtype(const at::Tensor& q, F&& f) {
  if (q.scalar_type() == at::kBFloat16)
    f(bf16_t{});
  else
    f(float{});
}

// A call's Shape: (B, H, T, D) q's T and D, and the op's arguments after the tensors (dropout's checked)
Shape call_shape(const at::Tensor& q, bool causal, double scale, double dropout_p, const std::optional<at::Tensor>& seed,
                 const char* op) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  Shape sh{q.size(2), q.size(3), causal, static_cast<float>(scale), static_cast<float>(dropout_p), 0};
  if (dropout_p > 0.0) {
    TORCH_CHECK(seed.has_value() && seed->defined() && seed->numel() == 1 && seed->device().is_cpu() &&
                    seed->scalar_type() == at::kLong,
                op, ": dropout_p > 0 needs seed, a one-element int64 CPU tensor");
    sh.seed = static_cast<uint64_t>(seed->item<int64_t>());
  }
  return sh;
}

}  // namespace nanogpt_cpu::attn
#define NG_KERNELS "attention_kernels.h"
#include "cpu/isa_clones.h"

namespace nanogpt_cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                                 bool causal, double scale, double dropout_p,
                                                 const std::optional<at::Tensor>& seed) {
  const char* op = "nanogpt_ext::attention_fwd";
  attn::check_q(q_, op);
  const at::Tensor q = attn::checked(q_, q_, op, "q"), k = attn::checked(k_, q_, op, "k"),
                   v = attn::checked(v_, q_, op, "v");
  const int64_t B = q.size(0), H = q.size(1), Tn = q.size(2), D = q.size(3);
  at::Tensor out = attn::new_bthd(q);
  at::Tensor lse = new_output(q, {B, H, Tn}, at::kFloat);
  const attn::Shape sh = attn::call_shape(q, causal, scale, dropout_p, seed, op);
  attn::with_dtype(q, [&](auto tag) {
    using T = decltype(tag);
    const auto fwd = NG_ISA_PICK(attn::fwd<T>);
    at::parallel_for(0, B * H, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> buf(attn::fwd_buffer(Tn, D));  // zero: the padding stays zero
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / H, h = t % H;
        fwd(attn::rows<T>(q, b, h), attn::rows<T>(k, b, h), attn::rows<T>(v, b, h), attn::head_ptr<T>(out, b, h),
            out.stride(2), lse.data_ptr<float>() + t * Tn, sh, sh.key(t), buf.data());
      }
    });
  });
  return {out, lse};
}

// The backward's per-(batch, head) task loop, writing dq, dk, dv ((B, H, T, D) views with one row stride)
void bwd_into(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dq, const at::Tensor& dk,
              const at::Tensor& dv, const attn::Shape& sh) {
  const int64_t H = q.size(1), Tn = q.size(2), D = q.size(3);
  attn::with_dtype(q, [&](auto tag) {
    using T = decltype(tag);
    const auto bwd = NG_ISA_PICK(attn::bwd<T>);
    at::parallel_for(0, q.size(0) * H, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> buf(attn::bwd_buffer(Tn, D));
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / H, h = t % H;
        bwd(attn::rows<T>(dout, b, h), attn::rows<T>(q, b, h), attn::rows<T>(k, b, h), attn::rows<T>(v, b, h),
            attn::rows<T>(out, b, h), lse.data_ptr<float>() + t * Tn, attn::head_ptr<T>(dq, b, h),
            attn::head_ptr<T>(dk, b, h), attn::head_ptr<T>(dv, b, h), dq.stride(2), sh, sh.key(t), buf.data());
      }
    });
  });
}

void check_lse(const at::Tensor& lse, const at::Tensor& q, const char* op) {
  TORCH_CHECK(lse.device().is_cpu() && lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                  lse.sizes() == q.sizes().slice(0, 3),
              op, ": lse must be a contiguous float32 CPU tensor of shape (B, H, T) from attention_fwd");
}

// The same checks as attention_fwd, over the backward's inputs and outputs.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(const at::Tensor& dout_, const at::Tensor& q_,
                                                             const at::Tensor& k_, const at::Tensor& v_,
                                                             const at::Tensor& out_, const at::Tensor& lse,
                                                             bool causal, double scale, double dropout_p,
                                                             const std::optional<at::Tensor>& seed) {
  const char* op = "nanogpt_ext::attention_bwd";
  attn::check_q(q_, op);
  const at::Tensor q = attn::checked(q_, q_, op, "q"), k = attn::checked(k_, q_, op, "k"),
                   v = attn::checked(v_, q_, op, "v"), out = attn::checked(out_, q_, op, "out"),
                   dout = attn::checked(dout_, q_, op, "grad of out");
  check_lse(lse, q, op);
  at::Tensor dq = attn::new_bthd(q), dk = attn::new_bthd(q), dv = attn::new_bthd(q);
  const attn::Shape sh = attn::call_shape(q, causal, scale, dropout_p, seed, op);
  bwd_into(dout, q, k, v, out, lse, dq, dk, dv, sh);
  return {dq, dk, dv};
}

using AttnFwd = decltype(attention_fwd);
const c10::TypedOperatorHandle<AttnFwd>& fwd_op() {
  static const auto op = ext_op<AttnFwd>("attention_fwd");
  return op;
}

// The arguments after the tensors, kept by the autograd Functions for their backward (which regenerates the dropout
// mask from the seed)
struct CallArgs {
  bool causal;
  double scale, dropout_p;
  std::optional<at::Tensor> seed;

  void save(torch::autograd::AutogradContext* ctx) const {
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["seed"] = seed;
  }
  static CallArgs saved(torch::autograd::AutogradContext* ctx) {
    const auto& d = ctx->saved_data;
    return {d.at("causal").toBool(), d.at("scale").toDouble(), d.at("dropout_p").toDouble(),
            d.at("seed").toOptional<at::Tensor>()};
  }
};

struct AttentionFn : public torch::autograd::Function<AttentionFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, bool causal, double scale, double dropout_p,
                            const std::optional<at::Tensor>& seed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = fwd_op().call(q, k, v, causal, scale, dropout_p, seed);
    ctx->save_for_backward({q, k, v, out, lse});
    CallArgs{causal, scale, dropout_p, seed}.save(ctx);
    return out;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static const auto bwd_op = ext_op<decltype(attention_bwd)>("attention_bwd");
    const auto s = ctx->get_saved_variables();
    const CallArgs a = CallArgs::saved(ctx);
    auto [dq, dk, dv] = bwd_op.call(grads[0], s[0], s[1], s[2], s[3], s[4], a.causal, a.scale, a.dropout_p, a.seed);
    return {dq, dk, dv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor attention_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                              double scale, double dropout_p, const std::optional<at::Tensor>& seed) {
  return AttentionFn::apply(q, k, v, causal, scale, dropout_p, seed);
}
// below autograd (no grad needed, inference mode): just the forward kernel
at::Tensor attention_plain(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, double scale,
                           double dropout_p, const std::optional<at::Tensor>& seed) {
  return std::get<0>(fwd_op().call(q, k, v, causal, scale, dropout_p, seed));
}

// Attention over c_attn's packed (B, T, 3C) output. q, k and v are views of its thirds split into n_head heads, the
// output comes back (B, T, C) and the backward writes dq, dk and dv into one (B, T, 3C) gradient: where PyTorch splits,
// the forward dispatches a view and a transpose per third and the backward concatenates the three gradients.
std::array<at::Tensor, 3> heads(const at::Tensor& qkv, int64_t n_head, const char* op) {
  TORCH_CHECK(qkv.dim() == 3 && n_head > 0 && qkv.size(2) > 0 && qkv.size(2) % (3 * n_head) == 0, op,
              ": qkv must be (B, T, 3 * C) with C a multiple of n_head = ", n_head, ", got shape ", qkv.sizes());
  const int64_t B = qkv.size(0), Tn = qkv.size(1), C = qkv.size(2) / 3;
  std::array<at::Tensor, 3> qkv_heads;
  for (int64_t i = 0; i < 3; ++i)
    qkv_heads[i] = qkv.narrow(2, i * C, C).view({B, Tn, n_head, C / n_head}).transpose(1, 2);  // (B, H, T, D)
  return qkv_heads;
}

// (B, T, C) view of the (B, H, T, D) output the forward stores (B, T, H, D)
at::Tensor heads_side_by_side(const at::Tensor& out) {
  return out.transpose(1, 2).view({out.size(0), out.size(2), out.size(1) * out.size(3)});
}

at::Tensor attention_qkv_bwd(const at::Tensor& dout_, const at::Tensor& qkv_, const at::Tensor& out_,
                             const at::Tensor& lse, int64_t n_head, bool causal, double scale, double dropout_p,
                             const std::optional<at::Tensor>& seed) {
  const char* op = "nanogpt_ext::attention_qkv_bwd";
  const at::Tensor qkv = attn::unit_stride(qkv_);
  const auto [q, k, v] = heads(qkv, n_head, op);
  attn::check_q(q, op);
  const std::vector<int64_t> btc{q.size(0), q.size(2), q.size(1) * q.size(3)};
  TORCH_CHECK(dout_.sizes() == at::IntArrayRef(btc), op, ": the grad of out has shape ", dout_.sizes(),
              ", expected (B, T, C) = ", at::IntArrayRef(btc));
  const at::Tensor dout = attn::checked(dout_.reshape(q.transpose(1, 2).sizes()).transpose(1, 2), q, op, "grad of out"),
                   out = attn::checked(out_, q, op, "out");
  check_lse(lse, q, op);
  at::Tensor dqkv = new_output(qkv, qkv.sizes(), qkv.scalar_type());
  const auto [dq, dk, dv] = heads(dqkv, n_head, op);
  const attn::Shape sh = attn::call_shape(q, causal, scale, dropout_p, seed, op);
  bwd_into(dout, q, k, v, out, lse, dq, dk, dv, sh);
  return dqkv;
}

// attention_fwd over qkv's heads: (out (B, H, T, D) stored (B, T, H, D), lse)
std::tuple<at::Tensor, at::Tensor> qkv_fwd(const at::Tensor& qkv, int64_t n_head, bool causal, double scale,
                                           double dropout_p, const std::optional<at::Tensor>& seed) {
  const auto [q, k, v] = heads(attn::unit_stride(qkv), n_head, "nanogpt_ext::attention_qkv");
  return fwd_op().call(q, k, v, causal, scale, dropout_p, seed);
}

struct AttentionQkvFn : public torch::autograd::Function<AttentionQkvFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& qkv, int64_t n_head, bool causal,
                            double scale, double dropout_p, const std::optional<at::Tensor>& seed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = qkv_fwd(qkv, n_head, causal, scale, dropout_p, seed);
    ctx->save_for_backward({qkv, out, lse});
    ctx->saved_data["n_head"] = n_head;
    CallArgs{causal, scale, dropout_p, seed}.save(ctx);
    return heads_side_by_side(out);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static const auto bwd_op = ext_op<decltype(attention_qkv_bwd)>("attention_qkv_bwd");
    const auto s = ctx->get_saved_variables();
    const CallArgs a = CallArgs::saved(ctx);
    return {bwd_op.call(grads[0], s[0], s[1], s[2], ctx->saved_data["n_head"].toInt(), a.causal, a.scale, a.dropout_p,
                        a.seed),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor attention_qkv_autograd(const at::Tensor& qkv, int64_t n_head, bool causal, double scale, double dropout_p,
                                  const std::optional<at::Tensor>& seed) {
  return AttentionQkvFn::apply(qkv, n_head, causal, scale, dropout_p, seed);
}
at::Tensor attention_qkv_plain(const at::Tensor& qkv, int64_t n_head, bool causal, double scale, double dropout_p,
                               const std::optional<at::Tensor>& seed) {
  return heads_side_by_side(std::get<0>(qkv_fwd(qkv, n_head, causal, scale, dropout_p, seed)));
}

}  // namespace
}  // namespace nanogpt_cpu

TORCH_LIBRARY_FRAGMENT(nanogpt_ext, m) {
  m.def("attention(Tensor q, Tensor k, Tensor v, bool causal, float scale, float dropout_p, Tensor? seed) -> Tensor");
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, bool causal, float scale, float dropout_p, Tensor? seed)"
        " -> (Tensor, Tensor)");
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool causal, float scale,"
        " float dropout_p, Tensor? seed) -> (Tensor, Tensor, Tensor)");
  m.def("attention_qkv(Tensor qkv, int n_head, bool causal, float scale, float dropout_p, Tensor? seed) -> Tensor");
  m.def("attention_qkv_bwd(Tensor dout, Tensor qkv, Tensor out, Tensor lse, int n_head, bool causal, float scale,"
        " float dropout_p, Tensor? seed) -> Tensor");
}

TORCH_LIBRARY_IMPL(nanogpt_ext, Autograd, m) {
  m.impl("attention", &nanogpt_cpu::attention_autograd);
  m.impl("attention_qkv", &nanogpt_cpu::attention_qkv_autograd);
}

TORCH_LIBRARY_IMPL(nanogpt_ext, CPU, m) {
  m.impl("attention", &nanogpt_cpu::attention_plain);
  m.impl("attention_fwd", &nanogpt_cpu::attention_fwd);
  m.impl("attention_bwd", &nanogpt_cpu::attention_bwd);
  m.impl("attention_qkv", &nanogpt_cpu::attention_qkv_plain);
  m.impl("attention_qkv_bwd", &nanogpt_cpu::attention_qkv_bwd);
}
