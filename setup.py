"""Packaging. `kernels/` installs as `fastforget.kernels` and `csrc/` as `fastforget.csrc`.

Native extensions build on first use (fastforget/native.py); FASTFORGET_BUILD_EXT=1 builds
them here instead, ahead of time, named by native.build_key (sources, torch, CPU ISA), so a
binary that no longer fits is passed over at run time.
"""
import os

from setuptools import setup

package_dir = {"fastforget": "fastforget", "fastforget.kernels": "kernels"}
# csrc's folders install as data-only packages, so native.py finds the sources next to itself.
native_dirs = ("common", "cpu", "cuda")
packages = ["fastforget", "fastforget.ops", "fastforget.bench", "fastforget.data", "fastforget.eval", "fastforget.models",
            "fastforget.train", "fastforget.kernels"]
packages += [f"fastforget.csrc.{d}" for d in native_dirs]
package_dir.update({f"fastforget.csrc.{d}": f"csrc/{d}" for d in native_dirs})
# the suffixes of native.NATIVE_SUFFIXES
package_data = {f"fastforget.csrc.{d}": ["*.cpp", "*.cu", "*.cuh", "*.h"] for d in native_dirs}
package_data["fastforget.data"] = ["digits.csv.gz"]

ext_modules, cmdclass = [], {}
if os.environ.get("FASTFORGET_BUILD_EXT") == "1":
    import importlib.util

    # native.py stands alone (torch only), so it loads without importing the package.
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("_ff_native", os.path.join(here, "fastforget", "native.py"))
    native = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(native)
    ext_modules, cmdclass = native.setup_extensions()

setup(
    license="MIT",
    package_dir=package_dir,
    packages=packages,
    package_data=package_data,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
