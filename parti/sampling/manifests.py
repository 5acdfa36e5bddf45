"""Reading an inference run's manifests: which requests are finished.

`parti.infer` appends one JSON line per finished request to manifest-HHHHH.jsonl (one
file per host); a rerun, and the image evaluation, read them back through here.
"""

from __future__ import annotations

import json
import pathlib


def finished_prompts(output_dir: pathlib.Path) -> dict[str, dict]:
  """request key (`Prompt.key`) -> its manifest entry, for requests whose files all exist
  (any host's)."""
  done = {}
  for manifest in sorted(output_dir.glob("manifest-*.jsonl")):
    for line in manifest.read_text(encoding="utf-8").splitlines():
      try:
        entry = json.loads(line)
      except json.JSONDecodeError:
        continue  # A line torn by a kill: that prompt is generated again.
      names = [*entry.get("files", []), *entry.get("upsampled_files", [])]
      if all((output_dir / name).is_file() for name in names):
        done[entry.get("request", entry["prompt"])] = entry
  return done
