// The Python module fastvit._C (setup.py's ahead-of-time build): empty. Importing it loads this shared
// library, whose static initializers (TORCH_LIBRARY in ops.cpp) register the fastvit_C ops; the JIT
// build (fastvit/extension.py) loads the same library with torch.ops.load_library instead.
#include <Python.h>

static struct PyModuleDef fastvit_c_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "fastvit_C ops (LayerNorm, bias+GELU, scaled residual, patchify and the LayerNorm+MLP / patch-embed "
    "composites), registered with the PyTorch dispatcher as torch.ops.fastvit_C.*; see fastvit.extension.",
    -1,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastvit_c_module); }
