"""The existing file or folder closest to a path that does not exist, for one-line "did you mean"
hints: a mistyped run folder (`outputs/D14-Learned-Finetuning/...` for the run folder
`outputs/D14-Learned-Finetuning-DiT-D14-2/`) or a checkpoint step the run never reached."""
import difflib
import os
import re

STEP_FILE = re.compile(r"^\d+\.(pt|pth|safetensors)$")  # checkpoints/{step:07d}.pt of a run folder
NAME_CUTOFF = 0.6  # difflib ratio below which a sibling is not offered as the one meant


def closest_existing_path(path):
    """The existing path closest to `path` (which does not exist), or None when nothing is close.

    From the deepest existing folder on the way to `path`, each missing name is replaced by its
    closest sibling (difflib ratio >= NAME_CUTOFF). The last name, when it is a step-numbered
    checkpoint (0500000.pt), becomes the newest checkpoint of that folder, since step numbers are
    not spelling mistakes; a folder reached instead of a file is offered as is (a run folder)."""
    parts = os.path.normpath(path).split(os.sep)
    folder = os.sep if os.path.isabs(path) else "."
    index = 0
    while index < len(parts) and os.path.exists(os.path.join(folder, parts[index])):
        folder = os.path.join(folder, parts[index])
        index += 1
    found_any = False
    for name in parts[index:]:
        if not os.path.isdir(folder):
            break
        sibling = closest_sibling(folder, name)
        if sibling is None:
            break
        folder, found_any = os.path.join(folder, sibling), True
    if not found_any:
        return None
    return os.path.normpath(folder) if os.path.isabs(path) else os.path.relpath(folder)


def closest_sibling(folder, name):
    """The entry of `folder` that `name` most likely meant, or None."""
    entries = sorted(os.listdir(folder))
    if name in entries:
        return name
    if STEP_FILE.match(name):
        steps = [entry for entry in entries if STEP_FILE.match(entry)]
        if steps:
            return max(steps, key=lambda entry: int(entry.split(".")[0]))
    matches = difflib.get_close_matches(name, entries, n=1, cutoff=NAME_CUTOFF)
    return matches[0] if matches else None


def did_you_mean(path):
    """`; the closest existing path is X` for a one-line error about missing `path`, or ""."""
    closest = closest_existing_path(path)
    return f"; the closest existing path is {closest}" if closest else ""
