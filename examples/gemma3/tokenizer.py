"""Gemma 3's tokenizer, built from the GGUF's own vocabulary fields.

The GGUF stores a SentencePiece BPE vocabulary (``tokenizer.ggml.model =
llama``): 262,144 pieces with their merge scores and types (normal, unknown,
control, user-defined, unused, byte), ``bos`` 2, ``eos`` 1, ``add_bos`` on,
no dummy space prefix, byte fallback (``<0x0A>`` ...). :class:`Tokenizer`
rebuilds the SentencePiece model from exactly those fields and runs it with the
``sentencepiece`` library; control tokens written in the text
(``<start_of_turn>``) are split out first, as HF's tokenizer does.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


class Tokenizer:
    """``encode(text) -> ids`` and ``decode(ids) -> text`` over the GGUF's vocabulary."""

    def __init__(self, fields: dict):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb

        self.fields = fields
        self.bos_id, self.eos_id = fields["bos_id"], fields["eos_id"]
        self.pad_id, self.unk_id = fields["pad_id"], fields["unk_id"]
        self.add_bos = fields["add_bos"]
        self.vocab_size = len(fields["tokens"])

        proto = pb.ModelProto()
        proto.trainer_spec.model_type = pb.TrainerSpec.BPE
        proto.trainer_spec.vocab_size = self.vocab_size
        proto.trainer_spec.byte_fallback = True
        proto.trainer_spec.unk_id = self.unk_id
        proto.trainer_spec.bos_id = self.bos_id
        proto.trainer_spec.eos_id = self.eos_id
        proto.trainer_spec.pad_id = self.pad_id
        proto.trainer_spec.allow_whitespace_only_pieces = True
        proto.trainer_spec.split_by_whitespace = False
        proto.normalizer_spec.name = "identity"
        proto.normalizer_spec.add_dummy_prefix = bool(fields.get("add_space_prefix", False))
        proto.normalizer_spec.remove_extra_whitespaces = False
        proto.normalizer_spec.escape_whitespaces = True
        for piece, score, kind in zip(fields["tokens"], fields["scores"], fields["types"]):
            p = proto.pieces.add()
            # The GGUF spells whitespace in user-defined pieces ("  ", "\t") as itself; the
            # SentencePiece model sees text with spaces escaped as U+2581, as HF's does.
            p.piece = piece.replace(" ", "\u2581") if kind == USER_DEFINED else piece
            p.score = score
            p.type = (
                kind if kind in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE) else NORMAL
            )
        self.sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())

        control = [
            t
            for t, k in zip(fields["tokens"], fields["types"])
            if k == CONTROL and len(t) > 2 and t.startswith("<") and t.endswith(">")
        ]
        wanted = set(control)
        self._control_ids = {t: i for i, t in enumerate(fields["tokens"]) if t in wanted}
        self._control_re = (
            re.compile("(" + "|".join(map(re.escape, sorted(control, key=len, reverse=True))) + ")")
            if control
            else None
        )
        self._special = {
            i for i, k in enumerate(fields["types"]) if k in (CONTROL, UNKNOWN, UNUSED)
        }

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text`` (``bos`` first when ``add_bos``, the GGUF's default)."""
        ids = [self.bos_id] if (self.add_bos if add_bos is None else add_bos) else []
        parts = self._control_re.split(text) if self._control_re else [text]
        for i, part in enumerate(parts):
            if i % 2 == 1:
                ids.append(self._control_ids[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Text of ``ids``: byte-fallback pieces joined into UTF-8, ``▁`` as spaces."""
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self._special]
        return self.sp.decode(ids)

    def piece(self, i: int) -> str:
        return self.fields["tokens"][int(i)]
