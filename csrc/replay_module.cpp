#include <pybind11/pybind11.h>
namespace py = pybind11;
PYBIND11_MODULE(_replay, m) { m.doc() = "zppo_fast replay ring"; }
