"""ChatGLM2 / ChatGLM3 tokenizer: a sentencepiece model plus 5 (ChatGLM2) or 9 (ChatGLM3) control tokens.

Ids: the sentencepiece pieces (0 ``<unk>`` = pad, 1 ``<s>``, 2 ``</s>``), then ``[MASK] [gMASK] [sMASK] sop eop``
and, for ChatGLM3, ``<|system|> <|user|> <|assistant|> <|observation|>`` (64789.. with the official model; the ids are
derived from the sentencepiece model's size). ``encode(text)`` = ``[gMASK] sop`` + pieces.

Safety: text never becomes a control token. ``<|user|>`` or ``sop`` typed by a user is encoded as ordinary text,
also when the official tokenizer_config.json registers those strings as added tokens. Control tokens come only
from the methods that build prompts (``build_chat_input``, ``build_single_message``, ``apply_chat_template`` with
this package's templates), or from text when the caller asks with ``encode_special_tokens=True``.

Works on transformers 4.30.2 through 5.x; version differences live in the "compat" section below.
"""
from __future__ import annotations

import inspect
import json
import os
import re
import shutil
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import sentencepiece as spm
import transformers
from transformers import PreTrainedTokenizer
from transformers.tokenization_utils_base import BatchEncoding
from transformers.utils import PaddingStrategy, logging

from .chat_format import (
    CHATGLM2,
    CHATGLM3,
    GLM_TOKENS,
    PREFIX_TOKENS,
    ROLE_TOKENS,
    ChatFormatError,
    build_chatglm2_prompt,
    build_chatglm3_ids,
    build_message_ids,
    chat_template,
    check_family,
    family_from_tokenizer_config,
    markup_dialect,
    special_tokens,
    stop_token_ids,
    unescape_markup,
    validate_chatglm2_history,
)

logger = logging.get_logger(__name__)

VOCAB_FILES_NAMES = {"vocab_file": "tokenizer.model"}
_MARKUP_ROLE_RE = re.compile(r"<\|(system|user|assistant|observation)\|>")

# sha256 of chat templates shipped in official tokenizer_config.json files; they are replaced by this package's
# template (theirs leave caller text unescaped and do not reproduce build_chat_input's ids).
_OFFICIAL_TEMPLATE_SHA256 = frozenset(
    {
        "e4496f930bf7b7bc7e7cf8232e90fd43ab4a9d8eb9c77f6ec98f5beb5c5cbeaa",  # chatglm3-6b
        "d0a00b0c9200e3aa26d889cd5b9c89e6a3dbf4135a9dfc581c822364b57a45ee",  # chatglm3-6b-128k
    }
)

# ----------------------------------------------------------------------------------------------------------------
# compat: every transformers version difference the tokenizer cares about
# ----------------------------------------------------------------------------------------------------------------
_BASE_PAD_PARAMS = inspect.signature(PreTrainedTokenizer._pad).parameters
#: transformers >= 4.45 passes ``padding_side`` to ``_pad`` / accepts it in ``__call__`` and ``pad``.
BASE_HAS_PADDING_SIDE = "padding_side" in _BASE_PAD_PARAMS
#: transformers >= 4.34 has ``apply_chat_template`` (4.30.2 does not).
BASE_HAS_CHAT_TEMPLATE = hasattr(PreTrainedTokenizer, "apply_chat_template")
#: transformers 5 renamed ``replace_additional_special_tokens`` to ``replace_extra_special_tokens``.
_ADD_SPECIAL_PARAMS = inspect.signature(PreTrainedTokenizer.add_special_tokens).parameters
_REPLACE_KWARG = next(
    (n for n in ("replace_extra_special_tokens", "replace_additional_special_tokens") if n in _ADD_SPECIAL_PARAMS),
    None,
)


def _compat_register_auto_class(cls: type) -> None:
    """transformers < 4.3x's AutoTokenizer does not register remote-code classes, so save_pretrained would not copy
    this file (and chat_format.py) next to the saved config. Register when loaded as remote code."""
    if getattr(cls, "_auto_class", None) is None and cls.__module__.startswith("transformers_modules."):
        cls.register_for_auto_class("AutoTokenizer")


#: transformers 4.34 – 4.4x compile chat templates in a method, with Jinja's own ``tojson`` (HTML-escaped, keys
#: sorted, text as \u escapes); later releases compile them elsewhere, with a ``tojson`` that is ``json.dumps``.
BASE_COMPILES_TEMPLATES = hasattr(PreTrainedTokenizer, "_compile_jinja_template")


def _compat_tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
                   sort_keys: bool = False) -> str:
    """The ``tojson`` filter of newer transformers, for the older ones: the tools JSON must be the text
    ``build_chat_input`` writes (``json.dumps(tools, indent=4, ensure_ascii=False)``)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _compat_call_kwargs(kwargs: Dict[str, Any]) -> Optional[str]:
    """On versions without a ``padding_side`` call argument, pop it so the caller can apply it itself."""
    if BASE_HAS_PADDING_SIDE:
        return None
    return kwargs.pop("padding_side", None)


# ----------------------------------------------------------------------------------------------------------------


def _sha256(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _is_official_template(template: Any) -> bool:
    """True for the chat templates of the official ChatGLM3 configs (``[gMASK]sop<|role|>\\n content`` style)."""
    if not isinstance(template, str) or markup_dialect(template) is not None:
        return False
    if _sha256(template) in _OFFICIAL_TEMPLATE_SHA256:
        return True
    # other copies (e.g. chatglm3-6b-32k) differ only in whitespace around the newline
    squashed = re.sub(r"\s+", "", template)
    return "[gMASK]sop<|{{message['role']}}|>" in squashed and "{{message['content']}}" in squashed


class SPTokenizer:
    """The sentencepiece model and the control tokens of one family (the official ``tokenizer.tokenizer`` object).

    Attributes: ``sp_model``, ``n_words`` (pieces + control tokens), ``bos_id``/``eos_id``/``pad_id``,
    ``special_tokens`` (str -> id), ``index_special_tokens`` (id -> str).
    """

    def __init__(self, model_path: str, family: str = CHATGLM3) -> None:
        if not model_path or not os.path.isfile(model_path):
            raise ValueError(
                f"sentencepiece tokenizer file not found: {model_path!r}. Put the tokenizer.model of the checkpoint "
                "(sha256 e7dc4c39…a6f2 for ChatGLM2/3) next to tokenizer_config.json, or pass vocab_file=<path>."
            )
        self.family = check_family(family)
        self.sp_model = spm.SentencePieceProcessor()
        if not self.sp_model.Load(model_path):
            raise ValueError(f"could not load the sentencepiece model {model_path!r}: the file is not a tokenizer.model")
        self.n_sp = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.unk_id()
        self.special_tokens: Dict[str, int] = {t: self.n_sp + i for i, t in enumerate(special_tokens(family))}
        self.index_special_tokens: Dict[int, str] = {i: t for t, i in self.special_tokens.items()}
        self.n_words = self.n_sp + len(self.special_tokens)
        for token in self.special_tokens:
            if self.sp_model.piece_to_id(token) != self.sp_model.unk_id():
                raise ValueError(
                    f"the sentencepiece model has a piece {token!r} that collides with a control token; "
                    "use a model without that piece"
                )
        self._split_re = re.compile("|".join(re.escape(t) for t in sorted(self.special_tokens, key=len, reverse=True)))

    # --- text <-> pieces / ids (no control tokens unless asked) ---
    def tokenize(self, s: str, encode_special_tokens: bool = False) -> List[str]:
        """Pieces of ``s``; with ``encode_special_tokens`` control-token strings in ``s`` become control tokens."""
        if not encode_special_tokens:
            return self.sp_model.encode(s, out_type=str)
        pieces: List[str] = []
        start = 0
        for match in self._split_re.finditer(s):
            if match.start() > start:
                pieces += self.sp_model.encode(s[start:match.start()], out_type=str)
            pieces.append(match.group())
            start = match.end()
        if start < len(s):
            pieces += self.sp_model.encode(s[start:], out_type=str)
        return pieces

    def encode(self, s: str, bos: bool = False, eos: bool = False) -> List[int]:
        """Sentencepiece ids of ``s`` (plain text), optionally with bos / eos."""
        ids = self.sp_model.encode(s)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        """Raw sentencepiece decoding of ``ids`` (the official inner ``decode``): each run of piece ids is decoded
        on its own (``<unk>``/pad shows as `` ⁇ ``), ChatGLM3 control tokens are written as their strings,
        ChatGLM2 control ids and ids outside the vocabulary give no text. ``ChatGLMTokenizer.decode`` is the
        user-facing one."""
        text: List[str] = []
        run: List[int] = []
        for index in (int(i) for i in ids):
            if 0 <= index < self.n_sp:
                run.append(index)
                continue
            if run:
                text.append(self.sp_model.decode(run))
                run = []
            if self.family == CHATGLM3 and index in self.index_special_tokens:
                text.append(self.index_special_tokens[index])
        if run:
            text.append(self.sp_model.decode(run))
        return "".join(text)

    def decode_tokens(self, tokens: Sequence[str], verbatim: Optional[Any] = None) -> str:
        """Join pieces and control-token strings (and the strings in ``verbatim``). A run of pieces that follows
        such a token keeps its leading space (sentencepiece drops it only at the start of the text)."""
        text: List[str] = []
        run: List[str] = []
        verbatim = verbatim if verbatim is not None else ()

        def flush() -> None:
            if run:
                decoded = self.sp_model.decode_pieces(run)
                if text and run[0].startswith("\u2581"):
                    decoded = " " + decoded
                text.append(decoded)
                run.clear()

        for token in tokens:
            if not token:
                continue
            if token in self.special_tokens or token in verbatim:
                flush()
                text.append(token)
            else:
                run.append(token)
        flush()
        return "".join(text)

    def convert_token_to_id(self, token: str) -> int:
        if token in self.special_tokens:
            return self.special_tokens[token]
        return self.sp_model.piece_to_id(token)

    def convert_id_to_token(self, index: int) -> str:
        """Piece or control-token string; ``""`` for pad/bos/eos, ChatGLM2 control ids and ids out of range."""
        if index in self.index_special_tokens:
            return self.index_special_tokens[index] if self.family == CHATGLM3 else ""
        if index < 0 or index >= self.n_sp or index in (self.bos_id, self.eos_id, self.pad_id):
            return ""
        return self.sp_model.id_to_piece(index)


class ChatGLMTokenizer(PreTrainedTokenizer):
    """Tokenizer of ChatGLM2 and ChatGLM3 (chosen by ``chat_format``; see ``family_from_tokenizer_config``).

    Outputs ``input_ids``, ``attention_mask`` and ``position_ids`` (each [batch, seq]); pads on the left by default,
    pad slots get ``attention_mask`` 0 and ``position_ids`` 0, real tokens positions 0..n-1.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask", "position_ids"]

    def __init__(
        self,
        vocab_file: Optional[str] = None,
        padding_side: str = "left",
        clean_up_tokenization_spaces: bool = False,
        encode_special_tokens: bool = False,
        chat_format: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        family = family_from_tokenizer_config({**kwargs, "chat_format": chat_format})
        self.name = "GLMTokenizer"
        self.vocab_file = vocab_file
        # The sentencepiece model must exist before the base __init__ (it calls get_vocab on transformers >= 4.34).
        self.tokenizer = SPTokenizer(vocab_file, family)
        self.chat_format = family
        self.encode_special_tokens = bool(encode_special_tokens)
        self._markup: Optional[str] = None  # chat-markup dialect while apply_chat_template tokenizes
        self.special_tokens = {
            "<bos>": self.tokenizer.bos_id,
            "<eos>": self.tokenizer.eos_id,
            "<unk>": self.tokenizer.pad_id,
            "<pad>": self.tokenizer.pad_id,
        }
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        template = kwargs.get("chat_template")
        if template is None or _is_official_template(template):
            kwargs["chat_template"] = chat_template(family)
        kwargs.setdefault("eos_token", "</s>")
        kwargs.setdefault("unk_token", "<unk>")
        kwargs.setdefault("pad_token", "<unk>")
        super().__init__(
            padding_side=padding_side,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            encode_special_tokens=self.encode_special_tokens,
            chat_format=family,
            **kwargs,
        )
        if not BASE_HAS_CHAT_TEMPLATE:  # 4.30.2 keeps unknown kwargs only in init_kwargs
            self.chat_template = kwargs["chat_template"]
        _compat_register_auto_class(type(self))

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        """Pieces + control tokens of the family (64798 for ChatGLM3, 64794 for ChatGLM2)."""
        return self.tokenizer.n_words

    def get_vocab(self) -> Dict[str, int]:
        vocab = {self.tokenizer.sp_model.id_to_piece(i): i for i in range(self.tokenizer.n_sp)}
        vocab.update(self.tokenizer.special_tokens)
        vocab.update(self._user_added_tokens())
        return vocab

    @property
    def unk_token_id(self) -> int:  # type: ignore[override]
        return self.tokenizer.pad_id

    @property
    def pad_token_id(self) -> int:  # type: ignore[override]
        return self.tokenizer.pad_id

    @pad_token_id.setter
    def pad_token_id(self, value: int) -> None:
        if value is not None and int(value) != self.tokenizer.pad_id:
            raise ValueError(f"ChatGLM pads with id {self.tokenizer.pad_id}; pad_token_id cannot be changed to {value}")

    @property
    def eos_token_id(self) -> int:  # type: ignore[override]
        return self.tokenizer.eos_id

    @eos_token_id.setter
    def eos_token_id(self, value: int) -> None:
        if value is not None and int(value) != self.tokenizer.eos_id:
            raise ValueError(f"ChatGLM's eos id is {self.tokenizer.eos_id}; eos_token_id cannot be changed to {value}")

    @property
    def stop_token_ids(self) -> List[int]:
        """Ids that end a chat reply: ChatGLM3 ``[eos, <|user|>, <|observation|>]``, ChatGLM2 ``[eos]``."""
        return stop_token_ids(self.chat_format, self.tokenizer.n_sp, self.tokenizer.eos_id)

    def _user_added_tokens(self) -> Dict[str, int]:
        """Tokens a user added on top of the vocabulary (ids >= vocab_size)."""
        added = getattr(self, "_added_tokens_encoder", None)
        if added is None:
            added = getattr(self, "added_tokens_encoder", None) or {}
        return {t: i for t, i in dict(added).items() if i >= self.tokenizer.n_words}

    def get_command(self, token: str) -> int:
        """Id of a control token (``"<|user|>"``, ``"[gMASK]"``, …) or of ``<bos>/<eos>/<pad>/<unk>``."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        if token in self.tokenizer.special_tokens:
            return self.tokenizer.special_tokens[token]
        raise ValueError(
            f"{token!r} is not a control token of the {self.chat_format} tokenizer: "
            f"use one of {sorted(self.tokenizer.special_tokens) + sorted(self.special_tokens)}"
        )

    def get_prefix_tokens(self) -> List[int]:
        """``[[gMASK], sop]``, the two ids every encoded input starts with."""
        return [self.tokenizer.special_tokens[t] for t in PREFIX_TOKENS]

    # ------------------------------------------------------------------ text -> tokens
    def tokenize(self, text: str, **kwargs: Any) -> List[str]:
        """Pieces of ``text``. Control-token strings in the text stay plain text unless ``encode_special_tokens``
        (init argument, attribute, or keyword here) is true. Added tokens registered by a config are ignored;
        tokens a user added beyond the vocabulary are split out."""
        if self._markup is not None:
            return self._markup_tokens(text, self._markup)
        special = bool(kwargs.get("encode_special_tokens", self.encode_special_tokens))
        user_added = self._user_added_tokens()
        if not user_added:
            return self.tokenizer.tokenize(text, encode_special_tokens=special)
        pattern = re.compile("|".join(re.escape(t) for t in sorted(user_added, key=len, reverse=True)))
        tokens: List[str] = []
        start = 0
        for match in pattern.finditer(text):
            tokens += self.tokenizer.tokenize(text[start:match.start()], encode_special_tokens=special)
            tokens.append(match.group())
            start = match.end()
        return tokens + self.tokenizer.tokenize(text[start:], encode_special_tokens=special)

    def _tokenize(self, text: str, **kwargs: Any) -> List[str]:
        return self.tokenizer.tokenize(text)

    def _convert_token_to_id(self, token: str) -> int:
        return self.tokenizer.convert_token_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.tokenizer.convert_id_to_token(index)

    def convert_ids_to_tokens(self, ids: Union[int, Sequence[int]], skip_special_tokens: bool = False):
        """Token strings; ``""`` for pad/bos/eos and unknown ids (as the official tokenizer)."""
        if hasattr(ids, "tolist"):  # tensors, numpy arrays and scalars
            ids = ids.tolist()
        if isinstance(ids, int):
            return self._id_to_token(ids)
        skip = self._control_ids() if skip_special_tokens else frozenset()
        return [self._id_to_token(int(i)) for i in ids if int(i) not in skip]

    def _id_to_token(self, index: int) -> str:
        if index >= self.tokenizer.n_words:
            decoder = getattr(self, "_added_tokens_decoder", None) or getattr(self, "added_tokens_decoder", {})
            token = decoder.get(index)
            return str(token) if token is not None else ""
        return self.tokenizer.convert_id_to_token(index)

    def _control_ids(self) -> frozenset:
        """Ids that ``skip_special_tokens`` removes: the family's control tokens, pad/bos/eos, special tokens."""
        sp = self.tokenizer
        return frozenset(sp.index_special_tokens) | {sp.pad_id, sp.bos_id, sp.eos_id} | set(self.all_special_ids)

    def convert_tokens_to_string(self, tokens: List[str]) -> str:
        return self.tokenizer.decode_tokens(tokens)

    def _decode(
        self,
        token_ids: Union[int, Sequence[int]],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: Optional[bool] = None,
        **kwargs: Any,
    ) -> str:
        """Text of ``token_ids``; ChatGLM3 control tokens are kept as ``<|user|>`` etc. unless
        ``skip_special_tokens``; pad/bos/eos and ids outside the vocabulary give no text."""
        if hasattr(token_ids, "tolist"):
            token_ids = token_ids.tolist()
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        tokens = self.convert_ids_to_tokens([int(i) for i in token_ids], skip_special_tokens=skip_special_tokens)
        text = self.tokenizer.decode_tokens(tokens, verbatim=self._user_added_tokens())
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return self.clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    # ------------------------------------------------------------------ special tokens around a sequence
    def build_inputs_with_special_tokens(
        self, token_ids_0: List[int], token_ids_1: Optional[List[int]] = None
    ) -> List[int]:
        """``[gMASK] sop`` + ids_0 (+ ids_1 + ``</s>`` for a pair)."""
        ids = self.get_prefix_tokens() + list(token_ids_0)
        if token_ids_1 is not None:
            ids += list(token_ids_1) + [self.tokenizer.eos_id]
        return ids

    def get_special_tokens_mask(
        self,
        token_ids_0: List[int],
        token_ids_1: Optional[List[int]] = None,
        already_has_special_tokens: bool = False,
    ) -> List[int]:
        if already_has_special_tokens:
            ids = list(token_ids_0) + list(token_ids_1 or [])
            control = self._control_ids()
            return [1 if int(i) in control else 0 for i in ids]
        mask = [1, 1] + [0] * len(token_ids_0)
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    def create_token_type_ids_from_sequences(
        self, token_ids_0: List[int], token_ids_1: Optional[List[int]] = None
    ) -> List[int]:
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return 3 if pair else 2

    # ------------------------------------------------------------------ chat
    def build_single_message(self, role: str, metadata: Optional[str], message: str) -> List[int]:
        """Ids of one ChatGLM3 message: ``[<|role|>] + encode(metadata + "\\n") + encode(message)``."""
        self._require_chatglm3("build_single_message")
        return build_message_ids(
            role, metadata, message, encode=self.tokenizer.encode, role_ids=self.tokenizer.special_tokens
        )

    def build_chat_input(
        self, query: str, history: Optional[Sequence[Any]] = None, role: str = "user"
    ) -> BatchEncoding:
        """Prompt for the next reply: BatchEncoding of ``input_ids``, ``attention_mask``, ``position_ids``,
        tensors of shape [1, n]. ChatGLM3: history of message dicts, ``query`` sent as ``role``, then
        ``<|assistant|>``. ChatGLM2: history of (query, response) pairs and the ``[Round N]`` prompt."""
        if self.chat_format == CHATGLM3:
            ids = build_chatglm3_ids(
                query,
                history,
                role,
                encode=self.tokenizer.encode,
                role_ids=self.tokenizer.special_tokens,
                prefix_ids=self.get_prefix_tokens(),
            )
        else:
            if role != "user":
                raise ChatFormatError(f"ChatGLM2 prompts have only user turns, got role {role!r}")
            ids = self.get_prefix_tokens() + self.tokenizer.encode(build_chatglm2_prompt(query, history))
        return self._single_row(ids)

    def build_prompt(self, query: str, history: Optional[Sequence[Sequence[str]]] = None) -> str:
        """ChatGLM2 prompt text ``[Round 1]\\n\\n问：…\\n\\n答：…`` for ``query`` after ``(query, response)`` pairs."""
        return build_chatglm2_prompt(query, validate_chatglm2_history(history))

    def _single_row(self, ids: List[int]) -> BatchEncoding:
        n = len(ids)
        data = {"input_ids": [ids], "attention_mask": [[1] * n], "position_ids": [list(range(n))]}
        return BatchEncoding(data, tensor_type="pt")

    def _require_chatglm3(self, what: str) -> None:
        if self.chat_format != CHATGLM3:
            raise ChatFormatError(f"{what} is a ChatGLM3 method; this tokenizer uses the {self.chat_format} format")

    # --- chat templates: the rendered markup is read by _markup_tokens, only inside apply_chat_template ---
    def encode_chat_markup(self, text: str, dialect: Optional[str] = None) -> List[int]:
        """Ids of text rendered by this package's chat template (``apply_chat_template(..., tokenize=False)``):
        ``[gMASK]sop`` at the start and ``<|role|>`` markers become ids, caller text stays text."""
        tokens = self._markup_tokens(text, check_family(dialect or self.chat_format))
        return self.convert_tokens_to_ids(tokens)

    def _markup_tokens(self, text: str, dialect: str) -> List[str]:
        sp = self.tokenizer
        tokens: List[str] = []
        prefix = "".join(PREFIX_TOKENS)
        if text.startswith(prefix):
            tokens += list(PREFIX_TOKENS)
            text = text[len(prefix):]
        if dialect == CHATGLM2:
            return tokens + sp.tokenize(text)
        parts = _MARKUP_ROLE_RE.split(text)  # [before, role, body, role, body, ...]
        tokens += sp.tokenize(unescape_markup(parts[0])) if parts[0] else []
        for role, body in zip(parts[1::2], parts[2::2]):
            tokens.append(f"<|{role}|>")
            head, newline, rest = body.partition("\n")
            if newline:
                tokens += sp.tokenize(unescape_markup(head + newline)) + sp.tokenize(unescape_markup(rest))
            elif body:
                tokens += sp.tokenize(unescape_markup(body))
        return tokens

    @contextmanager
    def _markup_mode(self, dialect: Optional[str]) -> Iterator[None]:
        previous, self._markup = self._markup, dialect
        try:
            yield
        finally:
            self._markup = previous

    if BASE_HAS_CHAT_TEMPLATE:

        def apply_chat_template(self, conversation: Any, *args: Any, **kwargs: Any) -> Any:
            """transformers' apply_chat_template; with this package's templates the ids equal
            ``build_chat_input`` (ChatGLM3) / the ``[Round N]`` prompt (ChatGLM2), and caller text never becomes
            a control token. Other templates are tokenized as plain text (or with ``encode_special_tokens``)."""
            base = super().apply_chat_template
            try:
                bound = inspect.signature(base).bind_partial(conversation, *args, **kwargs).arguments
            except TypeError:
                bound = kwargs
            template = bound.get("chat_template")
            if hasattr(self, "get_chat_template"):
                try:
                    template = self.get_chat_template(template, bound.get("tools"))
                except TypeError:
                    template = self.get_chat_template(template)
            elif template is None:
                template = self.chat_template
            dialect = markup_dialect(template)
            if dialect is None and not self.encode_special_tokens:
                logger.warning_once(
                    "This chat template is not a ChatGLM markup template: the control strings it writes are "
                    "tokenized as plain text. Use the template from this package's tokenizer_config.json, or set "
                    "tokenizer.encode_special_tokens = True for trusted input only."
                )
            with self._markup_mode(dialect):
                return base(conversation, *args, **kwargs)

    if BASE_COMPILES_TEMPLATES:

        def _compile_jinja_template(self, chat_template: str) -> Any:
            import jinja2.filters

            compiled = super()._compile_jinja_template(chat_template)
            filters = compiled.environment.filters
            if filters.get("tojson") is jinja2.filters.do_tojson:  # Jinja's own, not transformers' json.dumps
                # looked up when the template renders; called as the compiled code calls Jinja's (context first)
                filters["tojson"] = jinja2.pass_eval_context(lambda _context, value, **kw: _compat_tojson(value, **kw))
            return compiled

    # ------------------------------------------------------------------ padding
    def _pad(
        self,
        encoded_inputs: Union[Dict[str, Any], BatchEncoding],
        max_length: Optional[int] = None,
        padding_strategy: PaddingStrategy = PaddingStrategy.DO_NOT_PAD,
        pad_to_multiple_of: Optional[int] = None,
        padding_side: Optional[str] = None,
        return_attention_mask: Optional[bool] = None,
        **kwargs: Any,
    ) -> dict:
        """Pad one example (lists of length n) to ``max_length``; adds ``position_ids`` (0..n-1, 0 on pads).

        Pads on ``padding_side`` (argument, else ``self.padding_side``): ``input_ids`` with 0, ``attention_mask``
        and ``position_ids`` with 0.
        """
        side = padding_side if padding_side is not None else self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        required = encoded_inputs[self.model_input_names[0]]
        seq_length = len(required)
        if padding_strategy == PaddingStrategy.LONGEST:
            max_length = seq_length
        if max_length is not None and pad_to_multiple_of is not None and max_length % pad_to_multiple_of != 0:
            max_length = (max_length // pad_to_multiple_of + 1) * pad_to_multiple_of
        needs_padding = (
            padding_strategy != PaddingStrategy.DO_NOT_PAD and max_length is not None and seq_length < max_length
        )
        if return_attention_mask is not False and "attention_mask" not in encoded_inputs:
            encoded_inputs["attention_mask"] = [1] * seq_length
        if "position_ids" not in encoded_inputs:
            encoded_inputs["position_ids"] = list(range(seq_length))
        elif len(encoded_inputs["position_ids"]) != seq_length:
            raise ValueError(
                f"position_ids has length {len(encoded_inputs['position_ids'])} but input_ids has {seq_length}"
            )
        if not needs_padding:
            return encoded_inputs
        pad = max_length - seq_length
        fills = {
            self.model_input_names[0]: self.pad_token_id,
            "attention_mask": 0,
            "position_ids": 0,
            "token_type_ids": self.pad_token_type_id,
            "special_tokens_mask": 1,
        }
        for key, fill in fills.items():
            if key in encoded_inputs:
                values = list(encoded_inputs[key])
                encoded_inputs[key] = [fill] * pad + values if side == "left" else values + [fill] * pad
        return encoded_inputs

    def __call__(self, *args: Any, **kwargs: Any) -> BatchEncoding:
        side = _compat_call_kwargs(kwargs)
        with self._padding_side(side):
            return super().__call__(*args, **kwargs)

    def pad(self, *args: Any, **kwargs: Any) -> BatchEncoding:
        side = _compat_call_kwargs(kwargs)
        with self._padding_side(side):
            return super().pad(*args, **kwargs)

    @contextmanager
    def _padding_side(self, side: Optional[str]) -> Iterator[None]:
        """Temporarily use ``side`` (for transformers versions whose ``__call__``/``pad`` lack the argument)."""
        if side is None:
            yield
            return
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        previous, self.padding_side = self.padding_side, side
        try:
            yield
        finally:
            self.padding_side = previous

    def add_special_tokens(self, special_tokens_dict: Mapping[str, Any], *args: Any, **kwargs: Any) -> int:
        """transformers' add_special_tokens, accepting both ``replace_additional_special_tokens`` (4.x) and
        ``replace_extra_special_tokens`` (5.x). Control tokens already in the vocabulary get no new id."""
        for name in ("replace_additional_special_tokens", "replace_extra_special_tokens"):
            if name in kwargs and name != _REPLACE_KWARG:
                value = kwargs.pop(name)
                if _REPLACE_KWARG is not None:
                    kwargs[_REPLACE_KWARG] = value
        return super().add_special_tokens(special_tokens_dict, *args, **kwargs)

    # ------------------------------------------------------------------ saving
    def save_vocabulary(self, save_directory: str, filename_prefix: Optional[str] = None) -> Tuple[str]:
        """Copy tokenizer.model into ``save_directory``; returns ``(path,)``."""
        if not os.path.isdir(save_directory):
            raise ValueError(f"save_vocabulary needs an existing directory, got {save_directory!r}")
        name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        target = os.path.join(save_directory, name)
        if os.path.abspath(self.vocab_file) != os.path.abspath(target):
            if os.path.isfile(self.vocab_file):
                shutil.copyfile(self.vocab_file, target)
            else:
                with open(target, "wb") as f:
                    f.write(self.tokenizer.sp_model.serialized_model_proto())
        return (target,)
