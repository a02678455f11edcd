// Plain C launchers of nanogpt's CUDA kernels (layer_norm.cu, rms_norm.cu, bias_act.cu, rope.cu, adamw.cu).
// Torch-free: raw pointers, sizes, a stream; each returns the launch's cudaError_t.
// Tensors are contiguous and row-major: x is [rows, cols], weight/bias are [cols]; rope's inputs take strides.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// dtype codes for the void* arguments
enum { NG_F32 = 0, NG_BF16 = 1, NG_F16 = 2 };

// Rows of fp32 partial sums the column reductions (dweight, dbias) use: a function of rows
// only, so results are deterministic. Workspaces below are sized from it.
int64_t ng_colsum_chunks(int64_t rows);

// LayerNorm forward: y = (x - mean) * rstd * w (+ b); mean/rstd [rows] fp32. b may be NULL.
// x/y in x_dtype (F32/BF16/F16); w/b in w_dtype (x_dtype or F32).
cudaError_t ng_layer_norm_fwd(const void* x, const void* w, const void* b, void* y, float* mean, float* rstd,
                              int64_t rows, int64_t cols, float eps, int x_dtype, int w_dtype, cudaStream_t stream);

// LayerNorm backward: dx [rows, cols] (x_dtype), dw and db [cols] (w_dtype; db may be NULL).
// workspace: 2 * ng_colsum_chunks(rows) * cols floats.
cudaError_t ng_layer_norm_bwd(const void* dy, const void* x, const void* w, const float* mean, const float* rstd,
                              void* dx, void* dw, void* db, float* workspace, int64_t rows, int64_t cols,
                              int x_dtype, int w_dtype, cudaStream_t stream);

// RMSNorm forward: y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps) [rows] fp32. w may be NULL (no weight).
// x/y in x_dtype (F32/BF16/F16); w in w_dtype (x_dtype or F32; x_dtype without a weight).
cudaError_t ng_rms_norm_fwd(const void* x, const void* w, void* y, float* rstd, int64_t rows, int64_t cols,
                            float eps, int x_dtype, int w_dtype, cudaStream_t stream);

// RMSNorm backward: dx [rows, cols] (x_dtype) and, with a weight, dw [cols] (w_dtype).
// workspace: ng_colsum_chunks(rows) * cols floats (unused, may be NULL, without a weight).
cudaError_t ng_rms_norm_bwd(const void* dy, const void* x, const void* w, const float* rstd, void* dx, void* dw,
                            float* workspace, int64_t rows, int64_t cols, int x_dtype, int w_dtype,
                            cudaStream_t stream);

// y = act(x + bias) (bias may be NULL); act: 0 exact (erf) GELU, 1 tanh GELU, 2 ReLU^2.
cudaError_t ng_bias_act_fwd(const void* x, const void* bias, void* y, int64_t rows, int64_t cols, int act,
                            int x_dtype, int b_dtype, cudaStream_t stream);

// dx = dy * act'(x + bias); dbias = column sums of dx (b_dtype), when bias != NULL.
// workspace: ng_colsum_chunks(rows) * cols floats (unused, may be NULL, without bias).
cudaError_t ng_bias_act_bwd(const void* dy, const void* x, const void* bias, void* dx, void* dbias,
                            float* workspace, int64_t rows, int64_t cols, int act, int x_dtype, int b_dtype,
                            cudaStream_t stream);

// Rotary embeddings (rotate-half) on q [B, Hq, T, 2 * half] and k [B, Hk, T, 2 * half] in one launch: with x1, x2
// a row's halves, out = cat(x1 cos - x2 sin', x2 cos + x1 sin'), sin' = sign * sin (-1: the inverse turn, the
// backward). q and k at element strides {b, h, t} (q_strides, k_strides: 3 each, host memory) with a contiguous
// last dim; qo [B, Hq, T, 2 * half] and ko contiguous. cos, sin [T, half] fp32 contiguous. q, k, qo, ko in dtype
// (F32/BF16/F16).
cudaError_t ng_rope(const void* q, const void* k, void* qo, void* ko, const float* cos, const float* sin, int64_t B,
                    int64_t Hq, int64_t Hk, int64_t T, int64_t half, const int64_t* q_strides,
                    const int64_t* k_strides, float sign, int dtype, cudaStream_t stream);

// Total L2 norm of n tensors (grads[i]: numels[i] elements of dtypes[i]) into *norm_out (fp32),
// deterministically. workspace: ng_grad_norm_workspace(numels, n) doubles.
int64_t ng_grad_norm_workspace(const int64_t* numels, int n);
cudaError_t ng_grad_norm(const void* const* grads, const int* dtypes, const int64_t* numels, int n,
                         double* workspace, float* norm_out, cudaStream_t stream);

// Multi-tensor AdamW over n tensors of one dtype (params/grads; exp_avg, exp_avg_sq fp32; steps:
// one fp32 counter per tensor). Reads *lr (fp64) and *norm (fp32) on the device: a non-finite
// norm leaves everything untouched; otherwise grads are scaled by min(1, max_grad_norm /
// (norm + 1e-6)) when max_grad_norm > 0, then torch.optim.AdamW's update, and steps += 1.
cudaError_t ng_adamw(void* const* params, const void* const* grads, float* const* exp_avgs,
                     float* const* exp_avg_sqs, float* const* steps, const int64_t* numels, int n, int dtype,
                     const double* lr, const float* norm, float beta1, float beta2, float eps, float weight_decay,
                     float max_grad_norm, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
