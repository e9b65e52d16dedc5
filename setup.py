"""Packaging. `kernels/` installs as `fastforget.kernels` and `csrc/` as `fastforget.csrc`.

Native extensions build on first use (fastforget/native.py); FASTFORGET_BUILD_EXT=1 builds
them here instead, ahead of time.
"""
import os

from setuptools import setup

package_dir = {"fastforget": "fastforget", "fastforget.kernels": "kernels", "fastforget.csrc": "csrc"}
packages = ["fastforget", "fastforget.ops", "fastforget.bench", "fastforget.kernels", "fastforget.csrc"]
package_data = {"fastforget.csrc": ["*/*.cpp", "*/*.cu", "*/*.h"]}

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
    package_dir=package_dir,
    packages=packages,
    package_data=package_data,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
