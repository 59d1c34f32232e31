// An empty Python module named torchquant._C: importing it loads this shared
// library, whose static initialisers register the ops with the dispatcher.
// Built only into the Python extension (not the CMake library).
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "torchquant's C++ operators (registered as torch.ops.torchquant).", -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
