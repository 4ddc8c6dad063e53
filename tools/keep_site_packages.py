"""Make a new virtualenv see the packages of the interpreter running this script (``make``'s
keep-torch set-up: ``$(PYTHON) tools/keep_site_packages.py .venv``).

``python -m venv --system-site-packages`` shows the *base* interpreter's site-packages; when
$(PYTHON) is itself a virtualenv (or reaches its packages through .pth files), the torch it has
stays invisible. This writes every sys.path entry that site.py added for this interpreter
(site-packages, user site, what its .pth files name) into a .pth file of the new venv, loaded
after the venv's own packages so that what the venv installs comes first.
"""

import subprocess
import sys
from pathlib import Path


def site_added_paths():
    """sys.path entries that exist only because site.py ran (compare ``python -S``)."""
    bare = subprocess.run([sys.executable, "-S", "-c", "import sys; print('\\n'.join(sys.path))"],
                          capture_output=True, text=True, check=True).stdout.splitlines()
    return [p for p in sys.path if p and p not in bare and Path(p).is_dir()]


def main(venv):
    purelib = subprocess.run([str(Path(venv) / "bin" / "python"), "-c",
                              "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    pth = Path(purelib) / "zz-fusedformer-kept-site.pth"  # zz: after the venv's own .pth files
    pth.write_text("".join(f"{p}\n" for p in site_added_paths()))
    print(f"fusedformer: {pth} names {sys.executable}'s packages")


if __name__ == "__main__":
    main(sys.argv[1])
