// The Python module fastprompt._C. It has no Python-level members: importing it loads this
// library, whose static initialisers register the fastprompt_cpp::* ops with the dispatcher.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",                                       // m_name
      "fastprompt's C++ CPU kernels (registered as torch.ops.fastprompt_cpp.*).",
      -1,                                         // m_size
      nullptr,                                    // m_methods
  };
  return PyModule_Create(&module_def);
}
