"""Language identification with langid.py's model (shipped inside the wheel: works offline).

langid's own `classify` spends most of its time on a dense 7,480 x 97 float product and on a
uint32 -> float64 cast, though a short text visits only a few hundred DFA states. We fold the
model per state (see `_model`) and score only the visited states; the result matches langid's
classify (a test compares them) at several times the speed. Only a prefix of
the document (`prefix_chars`, 1,000 by default) is classified, which is plenty for one language.
Code documents are not classified: their "language" is `code:<programming language>`.
"""

from __future__ import annotations

import numpy as np

_MODEL = None


def _model():
    """The langid model folded for sparse scoring, built once per process (about 2 s).

    Every DFA state emits a fixed set of features, so the per-state sum of the features' class
    log-probabilities can be precomputed: scoring a text is then "count the states visited,
    multiply the counts by those rows". Same arithmetic as langid, in a different order."""
    global _MODEL
    if _MODEL is None:
        from langid.langid import LanguageIdentifier as Reference
        from langid.langid import model

        ident = Reference.from_modelstring(model, norm_probs=True)
        ptc = np.asarray(ident.nb_ptc, dtype=np.float64)
        nextmove = np.asarray(ident.tk_nextmove, dtype=np.int64)
        num_states = int(nextmove.max()) + 1
        row_of_state = np.full(num_states, -1, dtype=np.int64)
        rows = []
        for state, feats in sorted(ident.tk_output.items()):
            row_of_state[state] = len(rows)
            rows.append(ptc[np.asarray(list(feats), dtype=np.int64)].sum(axis=0))
        _MODEL = (
            ident,
            nextmove.tolist(),
            row_of_state,
            np.stack(rows),
            np.asarray(ident.nb_pc, dtype=np.float64),
            [str(c) for c in ident.nb_classes],
        )
    return _MODEL


class LanguageIdentifier:
    """Classifies text into an ISO 639-1 code with a normalized probability as the score."""

    def __init__(self, prefix_chars: int = 1000, languages: tuple[str, ...] = ()):
        self.prefix_chars = prefix_chars
        ident, self._nextmove, self._row_of_state, state_logp, pc, classes = _model()
        self._reference = ident
        if languages:
            keep = [i for i, c in enumerate(classes) if c in set(languages)]
            state_logp, pc, classes = state_logp[:, keep], pc[keep], [classes[i] for i in keep]
        self._state_logp, self._pc, self._classes = state_logp, pc, classes

    def log_probs(self, text: str) -> np.ndarray:
        """Unnormalized class log-probabilities of the text's prefix."""
        data = text[: self.prefix_chars].encode("utf-8")
        nextmove = self._nextmove
        if not data:
            return self._pc.copy()
        state = 0
        states = np.fromiter(
            (state := nextmove[(state << 8) + byte] for byte in data),
            dtype=np.int64,
            count=len(data),
        )
        counts = np.bincount(states)
        visited = np.flatnonzero(counts)
        rows = self._row_of_state[visited]
        has = rows >= 0
        return counts[visited[has]].astype(np.float64) @ self._state_logp[rows[has]] + self._pc

    def classify(self, text: str) -> tuple[str, float]:
        """(language code, probability in [0, 1])."""
        logp = self.log_probs(text)
        best = int(np.argmax(logp))
        # Normalized probability of the best class: 1 / sum(exp(logp - logp[best])).
        prob = 1.0 / float(np.exp(logp - logp[best]).sum())
        return self._classes[best], prob
