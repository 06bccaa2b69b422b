"""The README's Python example runs as written, and its commands are the ones CI runs."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def test_python_examples_run_as_written(capsys):
    blocks = re.findall(r"```python\n(.*?)```", readme(), re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "fc1/kernel" in out and "total" in out and "collapsed layers: []" in out


def test_ci_runs_the_readme_test_command():
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    test_cmd = re.search(r"^(python -m pytest.*?)\s+# tests$", readme(), re.M).group(1)
    assert test_cmd in ci.splitlines()
    install = re.search(r"pip install -e '\.\[test\]'", readme())
    assert install and "pip install -q -e '.[test]'" in ci
    main = re.search(r"^(lottery find-ticket --config (\S+))", readme(), re.M)
    assert main and os.path.exists(os.path.join(ROOT, main.group(2)))
