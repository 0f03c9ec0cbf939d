"""setuptools build hook: ship fwllm_mergekit.pth at the root of the wheel (= of site-packages).

pyproject.toml holds all the metadata. A .pth file is not a Python module, and data-files would
need a hard-coded `lib/pythonX.Y/site-packages`; copying it into build_lib next to the `fwllm`
package puts it in site-packages on every Python version and every platform.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

STARTUP_HOOK = "fwllm_mergekit.pth"


class BuildPyWithStartupHook(build_py):
    def run(self):
        super().run()
        self.copy_file(STARTUP_HOOK, os.path.join(self.build_lib, STARTUP_HOOK), preserve_mode=0)

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, STARTUP_HOOK)]


setup(cmdclass={"build_py": BuildPyWithStartupHook})
