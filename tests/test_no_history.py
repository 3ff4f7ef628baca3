"""The repository describes what enquant is, never how it was built: no build diary in tracked text files."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Phrases of a build diary: numbered work stops, borrowed machines, working sessions.
HISTORY = re.compile(
    r"\bstops? \d+\b|\bbefore stop\b|\bthis session\b|\bsessions?\b(?! ?[\"'(=])|\blent\b|\bborrowed\b|"
    r"\btaken back\b|\bwhen the machine\b",
    re.IGNORECASE)
# Words that look alike but are not history (pytest's fixture scope, the GPU benchmark script's name).
ALLOWED = re.compile(r"scope=\"session\"|gpu_session|Restart session|pytest session|test session|session's (persistent )?"
                     r"(compilation )?cache", re.IGNORECASE)
TEXT_SUFFIXES = {".py", ".md", ".json", ".jsonl", ".toml", ".sh", ".txt", ".ipynb", ".cfg", ".yaml", ".yml"}


def history_lines(text: str) -> list[str]:
  """The lines of ``text`` that tell the project's history."""
  return [line.strip()[:120] for line in text.splitlines()
          if HISTORY.search(ALLOWED.sub("", line))]


def test_history_phrases_are_caught():
  assert history_lines("measured in stop 16 on the lent GPU") and history_lines("runs before stop 10")
  assert history_lines("the one GPU lent so far") and history_lines("the machine was taken back")
  assert not history_lines('@pytest.fixture(scope="session")\nbash benchmarks/gpu_session.sh')
  assert not history_lines("a stop-gradient; the run stops when NaN appears")


def test_no_tracked_text_file_tells_the_projects_history():
  tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
  found = {}
  for name in tracked:
    path = ROOT / name
    if path.suffix not in TEXT_SUFFIXES or name == "tests/test_no_history.py" or not path.is_file():
      continue
    lines = history_lines(path.read_text(encoding="utf-8", errors="replace"))
    if lines:
      found[name] = lines[:3]
  assert not found, f"history in {len(found)} files: {found}"


def test_no_tracked_file_holds_an_absolute_path_of_the_checkout():
  """Committed results name run directories relative to the repository, never this machine's paths."""
  tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
  found = [name for name in tracked if (ROOT / name).suffix in TEXT_SUFFIXES and (ROOT / name).is_file()
           and str(ROOT) + "/" in (ROOT / name).read_text(encoding="utf-8", errors="replace")]
  assert not found, f"absolute paths of {ROOT} in {found}"
