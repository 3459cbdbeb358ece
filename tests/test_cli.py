import subprocess
import sys

from refcurv.catalogue import CONVENTIONS, METHODS
from refcurv.cli import main


def test_main_prints_catalogue_and_conventions(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name, *_ in METHODS + CONVENTIONS:
        assert name in out


def test_python_dash_m():
    r = subprocess.run([sys.executable, "-m", "refcurv"], capture_output=True, text=True, check=True)
    assert "Conventions:" in r.stdout and "KFAC" in r.stdout
