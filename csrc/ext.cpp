// The Python module _C of the extension. Loading it registers the nanogpt_ext::* custom ops:
// each op's file (csrc/<op>.cpp) defines its schemas, its CPU kernels, its C++ autograd and,
// built with NANOGPT_WITH_CUDA, its CUDA kernels (csrc/cuda/<op>.cu); the fake kernels for
// torch.compile come from the Python side. The module itself reports the build and
// chooses the ISA clone of the CPU kernels (csrc/cpu/common.h).
#include <Python.h>

#include <cstdlib>

#include "cpu/common.h"

namespace {

PyObject* has_cuda(PyObject*, PyObject*) {
#ifdef NANOGPT_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyObject* cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(nanogpt_cpu::kIsaNames[nanogpt_cpu::active_isa()]);
}

PyObject* cpu_isas(PyObject*, PyObject*) {
  PyObject* list = PyList_New(0);
  for (int i = 0; list && i < nanogpt_cpu::kNumIsas; ++i) {
    if (!nanogpt_cpu::isa_runs_here(i)) continue;
    PyObject* name = PyUnicode_FromString(nanogpt_cpu::kIsaNames[i]);
    if (!name || PyList_Append(list, name) < 0) Py_CLEAR(list);
    Py_XDECREF(name);
  }
  return list;
}

PyObject* set_cpu_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (!name) return nullptr;  // not a str: TypeError set
  const std::string err = nanogpt_cpu::select_isa(name);
  if (!err.empty()) {
    PyErr_Format(PyExc_ValueError, "set_cpu_isa('%s'): %s", name, err.c_str());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"has_cuda", has_cuda, METH_NOARGS, "Whether the CUDA kernels were compiled in."},
    {"cpu_isa", cpu_isa, METH_NOARGS, "The ISA clone of the CPU kernels that runs now, e.g. 'x86-64-v3'."},
    {"cpu_isas", cpu_isas, METH_NOARGS, "The ISA clones of the CPU kernels this CPU can run, best first."},
    {"set_cpu_isa", set_cpu_isa, METH_O,
     "Run the named ISA clone of the CPU kernels from now on (one of cpu_isas(); ValueError otherwise)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                      "nanogpt's C++/CUDA kernels; the ops are torch.ops.nanogpt_ext.*", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C() {
  // NANOGPT_CPU_ISA forces a clone; one this CPU cannot run fails the import (never a silent fallback)
  if (const char* want = std::getenv("NANOGPT_CPU_ISA"); want && *want) {
    const std::string err = nanogpt_cpu::select_isa(want);
    if (!err.empty()) {
      PyErr_Format(PyExc_ImportError, "NANOGPT_CPU_ISA=%s: %s. Unset NANOGPT_CPU_ISA or set it to one of those.",
                   want, err.c_str());
      return nullptr;
    }
  }
  return PyModule_Create(&module);
}
