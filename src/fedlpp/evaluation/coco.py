"""METEOR 1.5, ROUGE-L and CIDEr(-D) as the COCO caption evaluation code computes them (pycocoevalcap).

The E2E challenge's scorer feeds its outputs and references through that code: PTB
tokenisation (Stanford CoreNLP, a Java jar), then METEOR (a Java jar), ROUGE-L and CIDEr.
Both jars ship inside pycocoevalcap and need a ``java`` on the PATH; without one these
metrics are *unavailable* (reported as None with the reason), never 0 and never replaced by
something else.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence

COCO_METRICS = ("meteor", "rouge_l", "cider")
NO_JAVA = "needs Java (the PTB tokenizer and METEOR 1.5 are Java jars in pycocoevalcap); no `java` on the PATH"


def java_missing() -> str | None:
    """Why the COCO metrics cannot run here, or None when they can."""
    return None if shutil.which("java") else NO_JAVA


def coco_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """METEOR and ROUGE-L (0-100) and CIDEr of one output per input against all its references.

    Raises RuntimeError (with ``NO_JAVA``) when Java is missing: callers report the metrics as unavailable.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} outputs but {len(references)} reference sets")
    if java_missing():
        raise RuntimeError(NO_JAVA)
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    try:
        tokenizer = PTBTokenizer()
        refs = tokenizer.tokenize({str(i): [{"caption": r} for r in rs] for i, rs in enumerate(references)})
        hyps = tokenizer.tokenize({str(i): [{"caption": h}] for i, h in enumerate(hypotheses)})
        meteor = Meteor()
        try:
            meteor_score = meteor.compute_score(refs, hyps)[0]
        finally:
            del meteor  # stops its Java process
    except (OSError, ValueError, subprocess.SubprocessError) as e:  # a java that does not run the jars
        raise RuntimeError(f"the Java metrics failed to run ({type(e).__name__}: {e})") from None
    return {
        "meteor": 100.0 * float(meteor_score),
        "rouge_l": 100.0 * float(Rouge().compute_score(refs, hyps)[0]),
        "cider": float(Cider().compute_score(refs, hyps)[0]),
    }
