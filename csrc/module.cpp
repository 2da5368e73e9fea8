// The Python module fastprompt._C. It has no Python-level members: importing it loads this
// library, whose static initialisers register the CPU kernels of the fastprompt::* ops with the
// dispatcher (the schemas are defined in Python, fastprompt/ops).
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",                                       // m_name
      "fastprompt's C++ CPU kernels (registered for torch.ops.fastprompt.*).",
      -1,                                         // m_size
      nullptr,                                    // m_methods
  };
  return PyModule_Create(&module_def);
}
