// nanogpt._C: registers the nanogpt_ext::* custom ops (schemas + CPU kernels; CUDA kernels
// come from csrc/cuda/binding.cpp when built with NANOGPT_WITH_CUDA) and a tiny Python module
// with build information. Autograd formulas and fake (meta) kernels live in nanogpt/ext.py.
#include <Python.h>
#include <torch/library.h>

#include "cpu/ops.h"

TORCH_LIBRARY(nanogpt_ext, m) {
  m.def("layer_norm_fwd(Tensor x, Tensor weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_bwd(Tensor dy, Tensor x, Tensor weight, Tensor mean, Tensor rstd, bool has_bias)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("bias_gelu_fwd(Tensor x, Tensor? bias, bool tanh) -> Tensor");
  m.def("bias_gelu_bwd(Tensor dy, Tensor x, Tensor? bias, bool tanh) -> (Tensor, Tensor)");
  m.def("grad_norm(Tensor[] grads) -> Tensor");
  m.def("adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs,"
        " Tensor(d!)[] steps, Tensor lr, Tensor norm, float beta1, float beta2, float eps, float weight_decay,"
        " float max_grad_norm) -> ()");
}

TORCH_LIBRARY_IMPL(nanogpt_ext, CPU, m) {
  m.impl("layer_norm_fwd", &nanogpt_cpu::layer_norm_fwd);
  m.impl("layer_norm_bwd", &nanogpt_cpu::layer_norm_bwd);
  m.impl("bias_gelu_fwd", &nanogpt_cpu::bias_gelu_fwd);
  m.impl("bias_gelu_bwd", &nanogpt_cpu::bias_gelu_bwd);
  m.impl("grad_norm", &nanogpt_cpu::grad_norm);
  m.impl("adamw_", &nanogpt_cpu::adamw_);
}

namespace {

PyObject* has_cuda(PyObject*, PyObject*) {
#ifdef NANOGPT_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyObject* cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(nanogpt_cpu::cpu_isa()); }

PyMethodDef methods[] = {
    {"has_cuda", has_cuda, METH_NOARGS, "Whether the CUDA kernels were compiled in."},
    {"cpu_isa", cpu_isa, METH_NOARGS, "Which ISA clone of the CPU kernels runs on this machine."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                      "nanogpt's C++/CUDA kernels; the ops are torch.ops.nanogpt_ext.*", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module); }
