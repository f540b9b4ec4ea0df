"""Nothing from a .arch file becomes executable Python: hostile comments and names stay inert."""
import ast
import subprocess
import sys
from pathlib import Path

import archc.api as api

HOSTILE = Path(__file__).parent / "data" / "hostile.arch"


def test_hostile_comment_is_only_a_docstring_and_names_are_mangled(tmp_path):
    src = api.compile(HOSTILE).source
    tree = ast.parse(src)
    doc = ast.get_docstring(tree)
    assert '__import__("os").system("echo PWNED")' in doc          # kept as text...
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "system"]
    assert not calls                                                # ...never as code
    out = tmp_path / "hostile_model.py"
    out.write_text(src)
    code = (f"import sys, torch; sys.path.insert(0, {str(tmp_path)!r}); import hostile_model as h; "
            "m = h.Evil(); print(tuple(m(torch.randn(1, 3, 4)).shape)); print(sorted(m.state_dict()))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "PWNED" not in r.stdout and "(1, 3, 4)" in r.stdout
    # names that collide with nn.Module attributes or start with `_` get a trailing underscore
    assert "state_dict_.forward_.weight" in r.stdout and "_hidden_.weight" in r.stdout
