// Python entry point of the extension `icl_kernels._C`.  Importing it runs the
// static TORCH_LIBRARY registrations of every source file; the module itself
// holds no Python functions (the ops are reached through torch.ops.icl_kernels).
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "Compiled kernels of icl_kernels (see torch.ops.icl_kernels).",
      -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
}
