"""Chat formats of ChatGLM2 and ChatGLM3: the data, plus small pure functions shared by the tokenizer
(``build_chat_input``, ``build_prompt``, the ``chat_template``) and the model (``chat``, ``stream_chat``).

Nothing here imports torch or transformers. Token ids are plain ``list[int]``; text is encoded by a callable
``encode(text) -> list[int]`` that the caller supplies (the tokenizer's sentencepiece encoder, no prefix).

Families
    ``"chatglm3"``: messages ``<|role|>`` + encode(f"{metadata}\\n") + encode(content), then ``<|assistant|>``.
    ``"chatglm2"``: the text prompt ``[Round N]\\n\\n问：…\\n\\n答：…``.
Both are encoded after the prefix ``[gMASK] sop``.

Reply parsing never evaluates model output: tool calls are read with ``ast.parse`` and only literal nodes are
accepted (see :func:`parse_tool_call`).
"""
from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

__all__ = [
    "CHATGLM2",
    "CHATGLM3",
    "FAMILIES",
    "ROLES",
    "PREFIX_TOKENS",
    "GLM_TOKENS",
    "ROLE_TOKENS",
    "SP_VOCAB_SIZE",
    "ChatDefaults",
    "CHAT_DEFAULTS",
    "ChatFormatError",
    "ToolCallError",
    "special_tokens",
    "special_token_ids",
    "stop_token_ids",
    "chat_defaults",
    "family_from_tokenizer_config",
    "check_family",
    "validate_chatglm3_history",
    "validate_chatglm2_history",
    "system_content",
    "build_message_ids",
    "build_chatglm3_ids",
    "build_chatglm2_prompt",
    "parse_tool_call",
    "process_chatglm3_response",
    "process_chatglm2_response",
    "chat_template",
    "CHATGLM3_TEMPLATE",
    "CHATGLM2_TEMPLATE",
    "MARKUP_ESCAPE",
    "markup_dialect",
    "escape_markup",
    "unescape_markup",
]

# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------

CHATGLM3 = "chatglm3"
CHATGLM2 = "chatglm2"
FAMILIES: Tuple[str, ...] = (CHATGLM3, CHATGLM2)

ROLES: Tuple[str, ...] = ("system", "user", "assistant", "observation")
#: Control tokens of both families, in id order right after the sentencepiece pieces.
GLM_TOKENS: Tuple[str, ...] = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
#: ChatGLM3 adds one token per role, in id order after GLM_TOKENS.
ROLE_TOKENS: Tuple[str, ...] = tuple(f"<|{role}|>" for role in ROLES)
#: Every encoded input starts with these two tokens.
PREFIX_TOKENS: Tuple[str, ...] = ("[gMASK]", "sop")
#: Pieces in the official tokenizer.model; the control ids start here (64789 = [MASK]).
SP_VOCAB_SIZE = 64789
EOS_ID = 2

TRAINING_TIME_PLACEHOLDER = "[[训练时间]]"
TRAINING_TIME_VALUE = "2023年"


@dataclass(frozen=True)
class ChatDefaults:
    """Sampling defaults of ``chat()`` / ``stream_chat()`` for one variant (SPEC §1)."""

    max_length: int
    top_p: float
    temperature: float


CHAT_DEFAULTS: Mapping[str, ChatDefaults] = {
    "chatglm2-6b": ChatDefaults(8192, 0.8, 0.8),
    "chatglm2-6b-32k": ChatDefaults(32768, 0.8, 0.8),
    "chatglm2-6b-int4": ChatDefaults(8192, 0.8, 0.8),
    "chatglm3-6b": ChatDefaults(8192, 0.8, 0.8),
    "chatglm3-6b-32k": ChatDefaults(32768, 0.8, 0.8),
    "chatglm3-6b-128k": ChatDefaults(131072, 0.7, 0.95),
    # family defaults = the base variant of each family
    CHATGLM3: ChatDefaults(8192, 0.8, 0.8),
    CHATGLM2: ChatDefaults(8192, 0.8, 0.8),
}


class ChatFormatError(ValueError):
    """A conversation, role or message does not fit the chat format; the message says what to change."""


class ToolCallError(ValueError):
    """A tool call in a model reply could not be read as literal arguments."""


# --------------------------------------------------------------------------------------------------------------
# Family, special tokens, stop ids, defaults
# --------------------------------------------------------------------------------------------------------------


def check_family(family: str) -> str:
    """Return ``family`` if it is ``"chatglm3"`` or ``"chatglm2"``; raise ChatFormatError otherwise."""
    if family not in FAMILIES:
        raise ChatFormatError(f"unknown chat format {family!r}: use one of {list(FAMILIES)}")
    return family


def special_tokens(family: str) -> Tuple[str, ...]:
    """Control token strings of ``family`` in id order (5 for ChatGLM2, 9 for ChatGLM3)."""
    return GLM_TOKENS + ROLE_TOKENS if check_family(family) == CHATGLM3 else GLM_TOKENS


def special_token_ids(family: str, sp_vocab_size: int = SP_VOCAB_SIZE) -> Dict[str, int]:
    """Control token string -> id; ids follow the ``sp_vocab_size`` sentencepiece pieces."""
    return {token: sp_vocab_size + i for i, token in enumerate(special_tokens(family))}


def stop_token_ids(family: str, sp_vocab_size: int = SP_VOCAB_SIZE, eos_id: int = EOS_ID) -> List[int]:
    """Ids that end generation: ChatGLM3 ``[2, 64795 <|user|>, 64797 <|observation|>]``; ChatGLM2 ``[2]``."""
    if check_family(family) == CHATGLM2:
        return [eos_id]
    ids = special_token_ids(family, sp_vocab_size)
    return [eos_id, ids["<|user|>"], ids["<|observation|>"]]


def chat_defaults(name: str) -> ChatDefaults:
    """Chat sampling defaults for a variant name (``"chatglm3-6b-128k"``) or a family (``"chatglm3"``)."""
    key = name.rsplit("/", 1)[-1].lower()
    if key not in CHAT_DEFAULTS:
        raise ChatFormatError(f"no chat defaults for {name!r}: use one of {sorted(CHAT_DEFAULTS)}")
    return CHAT_DEFAULTS[key]


def family_from_tokenizer_config(config: Mapping[str, Any]) -> str:
    """Which chat family a tokenizer config describes.

    Rule, first match wins:
      1. an explicit ``chat_format`` key (this package's configs): ``"chatglm3"`` or ``"chatglm2"``;
      2. a ``chat_template`` (only the official ChatGLM3 configs carry one) -> chatglm3;
      3. ``added_tokens_decoder`` naming a role token such as ``<|user|>`` -> chatglm3;
      4. ``name_or_path`` containing ``chatglm3`` -> chatglm3;
      5. otherwise chatglm2 (the official ChatGLM2 configs have none of the above; chatglm2-6b-int4's says
         ``THUDM/chatglm-6b``).
    """
    explicit = config.get("chat_format")
    if explicit is not None:
        return check_family(str(explicit))
    if config.get("chat_template"):
        return CHATGLM3
    added = config.get("added_tokens_decoder") or {}
    if isinstance(added, Mapping):
        for value in added.values():
            content = value.get("content") if isinstance(value, Mapping) else getattr(value, "content", value)
            if content in ROLE_TOKENS:
                return CHATGLM3
    if "chatglm3" in str(config.get("name_or_path") or "").lower():
        return CHATGLM3
    return CHATGLM2


# --------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------


def _check_role(role: Any) -> str:
    if role not in ROLES:
        raise ChatFormatError(f"unknown role {role!r}: ChatGLM3 roles are {list(ROLES)}")
    return role


def _check_text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ChatFormatError(f"{what} must be a str, got {type(value).__name__}: convert it to text first")
    return value


def _check_metadata(value: Any, what: str) -> str:
    metadata = "" if value is None else _check_text(value, what)
    if "\n" in metadata:
        raise ChatFormatError(f"{what} must be a single line (it is followed by a newline in the prompt): {metadata!r}")
    return metadata


def validate_chatglm3_history(history: Optional[Sequence[Mapping[str, Any]]]) -> List[Dict[str, Any]]:
    """Check a ChatGLM3 history and return it as a new list of dicts.

    Each item: ``{"role": one of ROLES, "content": str, "metadata": str (optional, one line),
    "tools": list (optional, system messages only)}``. Extra keys are kept and ignored.
    """
    if history is None:
        return []
    if isinstance(history, (str, bytes, Mapping)) or not isinstance(history, Sequence):
        raise ChatFormatError(
            f"history must be a list of message dicts, got {type(history).__name__}: "
            'e.g. [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "..."}]'
        )
    checked = []
    for i, item in enumerate(history):
        if not isinstance(item, Mapping):
            raise ChatFormatError(
                f"history[{i}] must be a dict with 'role' and 'content', got {type(item).__name__} {item!r}"
                " (ChatGLM2-style (query, response) pairs belong to the chatglm2 format)"
            )
        if "role" not in item or "content" not in item:
            raise ChatFormatError(f"history[{i}] needs the keys 'role' and 'content', got keys {sorted(item)}")
        role = item["role"]
        if role not in ROLES:
            raise ChatFormatError(f"history[{i}] has unknown role {role!r}: ChatGLM3 roles are {list(ROLES)}")
        _check_text(item["content"], f"history[{i}]['content']")
        _check_metadata(item.get("metadata"), f"history[{i}]['metadata']")
        if item.get("tools") is not None:
            if role != "system":
                raise ChatFormatError(f"history[{i}] has 'tools' but role {role!r}: tools belong on the system message")
            _tools_json(item["tools"], f"history[{i}]['tools']")
        checked.append(dict(item))
    return checked


def validate_chatglm2_history(history: Optional[Sequence[Sequence[str]]]) -> List[Tuple[str, str]]:
    """Check a ChatGLM2 history of ``(query, response)`` pairs (tuples or lists); return a list of tuples."""
    if history is None:
        return []
    if isinstance(history, (str, bytes, Mapping)) or not isinstance(history, Sequence):
        raise ChatFormatError(f"history must be a list of (query, response) pairs, got {type(history).__name__}")
    pairs = []
    for i, pair in enumerate(history):
        if isinstance(pair, (str, bytes, Mapping)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise ChatFormatError(f"history[{i}] must be a (query, response) pair, got {pair!r}")
        query = _check_text(pair[0], f"history[{i}][0] (query)")
        response = _check_text(pair[1], f"history[{i}][1] (response)")
        pairs.append((query, response))
    return pairs


# --------------------------------------------------------------------------------------------------------------
# Building prompts
# --------------------------------------------------------------------------------------------------------------


def _tools_json(tools: Any, what: str = "tools") -> str:
    try:
        return json.dumps(tools, indent=4, ensure_ascii=False)
    except (TypeError, ValueError) as err:
        raise ChatFormatError(f"{what} must be JSON-serialisable (a list of tool descriptions): {err}") from None


def system_content(message: Mapping[str, Any]) -> str:
    """The text of a message; a system message with ``tools`` gets ``"\\n" + json.dumps(tools, indent=4)``."""
    content = message["content"]
    if message.get("role") == "system" and message.get("tools") is not None:
        content = content + "\n" + _tools_json(message["tools"])
    return content


def build_message_ids(
    role: str,
    metadata: Optional[str],
    content: str,
    *,
    encode: Callable[[str], List[int]],
    role_ids: Mapping[str, int],
) -> List[int]:
    """Ids of one ChatGLM3 message: ``[<|role|>] + encode(metadata + "\\n") + encode(content)`` (length ≥ 1)."""
    _check_role(role)
    metadata = _check_metadata(metadata, "metadata")
    _check_text(content, "message content")
    return [role_ids[f"<|{role}|>"]] + list(encode(metadata + "\n")) + list(encode(content))


def build_chatglm3_ids(
    query: str,
    history: Optional[Sequence[Mapping[str, Any]]],
    role: str,
    *,
    encode: Callable[[str], List[int]],
    role_ids: Mapping[str, int],
    prefix_ids: Sequence[int],
) -> List[int]:
    """Prompt ids of a ChatGLM3 conversation (history, then ``query`` as ``role``, then ``<|assistant|>``).

    Returns ``prefix_ids + messages + [<|assistant|>]``: one flat list, the row of ``input_ids`` [1, n].
    """
    messages = validate_chatglm3_history(history)
    _check_role(role)
    _check_text(query, "query")
    ids = list(prefix_ids)
    for message in messages:
        ids += build_message_ids(
            message["role"], message.get("metadata"), system_content(message), encode=encode, role_ids=role_ids
        )
    ids += build_message_ids(role, "", query, encode=encode, role_ids=role_ids)
    ids.append(role_ids["<|assistant|>"])
    return ids


def build_chatglm2_prompt(query: str, history: Optional[Sequence[Sequence[str]]] = None) -> str:
    """ChatGLM2 prompt text: past rounds ``[Round i]\\n\\n问：q\\n\\n答：r\\n\\n``, then ``[Round n]\\n\\n问：query\\n\\n答：``."""
    pairs = validate_chatglm2_history(history)
    _check_text(query, "query")
    rounds = [f"[Round {i}]\n\n问：{q}\n\n答：{r}\n\n" for i, (q, r) in enumerate(pairs, start=1)]
    return "".join(rounds) + f"[Round {len(pairs) + 1}]\n\n问：{query}\n\n答："


# --------------------------------------------------------------------------------------------------------------
# Reply parsing (no eval)
# --------------------------------------------------------------------------------------------------------------

_MAX_TOOL_CALL_CHARS = 100_000
_MAX_LITERAL_DEPTH = 64
_JSON_NAMES = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}


def _literal(node: ast.AST, depth: int = 0) -> Any:
    """Value of a literal expression node: str/int/float/bool/None, lists, tuples (as lists), dicts, -number."""
    if depth > _MAX_LITERAL_DEPTH:
        raise ToolCallError("argument nesting is too deep")
    if isinstance(node, ast.Constant):
        if node.value is None or isinstance(node.value, (str, bool, int, float)):
            return node.value
        raise ToolCallError(f"unsupported constant {node.value!r}")
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = _literal(node.operand, depth + 1)
        if isinstance(operand, bool) or not isinstance(operand, (int, float)):
            raise ToolCallError("a sign may only precede a number")
        return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(item, depth + 1) for item in node.elts]
    if isinstance(node, ast.Dict):
        result = {}
        for key, value in zip(node.keys, node.values):
            if key is None:
                raise ToolCallError("'**' inside a dict is not a literal")
            key_value = _literal(key, depth + 1)
            if isinstance(key_value, (list, dict)):
                raise ToolCallError("dict keys must be strings or numbers")
            result[key_value] = _literal(value, depth + 1)
        return result
    raise ToolCallError(f"only literal arguments are accepted, got {type(node).__name__} expression")


def _tool_call_source(content: str) -> str:
    """The code of a tool call: the content without surrounding Markdown code fences."""
    lines = content.strip().split("\n")
    if lines and lines[0].strip().startswith("```"):
        lines = lines[1:]
    if lines and lines[-1].strip().startswith("```"):
        lines = lines[:-1]
    return "\n".join(lines).strip()


def parse_tool_call(content: str) -> Dict[str, Any]:
    """Arguments of a tool call written by the model, without evaluating anything.

    Accepts ``tool_call(a=1, b='x', c=[1, {"k": None}], d=-2.5)`` (keyword arguments, literal values only),
    ``tool_call({"a": 1})`` / ``tool_call(**{"a": 1})``, or a JSON object ``{"a": 1}``, each optionally inside a
    Markdown code fence. Tuples come back as lists. Raises ToolCallError for anything else.
    """
    source = _tool_call_source(content)
    if not source:
        raise ToolCallError("the tool call is empty")
    if len(source) > _MAX_TOOL_CALL_CHARS:
        raise ToolCallError(f"the tool call is longer than {_MAX_TOOL_CALL_CHARS} characters")
    if source.startswith("{"):
        try:
            value = json.loads(source)
        except ValueError as err:
            raise ToolCallError(f"invalid JSON arguments: {err}") from None
        if not isinstance(value, dict):
            raise ToolCallError("JSON arguments must be an object")
        return value
    try:
        tree = ast.parse(source, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
        raise ToolCallError(f"not a call expression: {type(err).__name__}: {err}") from None
    call = tree.body
    if not isinstance(call, ast.Call) or not (isinstance(call.func, ast.Name) and call.func.id == "tool_call"):
        raise ToolCallError("expected tool_call(name=value, ...)")
    params: Dict[str, Any] = {}
    try:
        for arg in call.args:
            value = _literal(arg)
            if len(call.args) != 1 or not isinstance(value, dict):
                raise ToolCallError("tool_call takes keyword arguments or a single dict")
            params.update(value)
        for keyword in call.keywords:
            value = _literal(keyword.value)
            if keyword.arg is None:
                if not isinstance(value, dict):
                    raise ToolCallError("'**' needs a dict literal")
                params.update(value)
            elif keyword.arg in params:
                raise ToolCallError(f"keyword argument {keyword.arg!r} repeated")
            else:
                params[keyword.arg] = value
    except RecursionError:
        raise ToolCallError("argument nesting is too deep") from None
    return params


def _has_tools(history: Sequence[Mapping[str, Any]]) -> bool:
    return any(
        isinstance(m, Mapping) and m.get("role") == "system" and m.get("tools") is not None for m in history
    )


def process_chatglm3_response(
    output: str, history: Sequence[Mapping[str, Any]]
) -> Tuple[Union[str, Dict[str, Any]], List[Dict[str, Any]]]:
    """Parse a decoded ChatGLM3 reply (prompt excluded, stop token removed) and extend the history.

    ``output`` is split at ``<|assistant|>``; in each part the first line is metadata, the rest content. Every
    part is appended to a copy of ``history`` as ``{"role": "assistant", "metadata", "content"}`` (raw text).
    The response returned is that of the last part:
      - no metadata: the stripped content, ``[[训练时间]]`` replaced by ``2023年``;
      - metadata and a system message with tools: ``{"name": metadata, "parameters": {...}}``; a call that
        cannot be read gives ``{"name", "content": raw content, "parse_error": reason}`` instead of raising;
      - metadata without tools: ``{"name": metadata, "content": content}``.
    """
    _check_text(output, "model output")
    new_history = [dict(m) for m in history]
    with_tools = _has_tools(new_history)
    response: Union[str, Dict[str, Any]] = ""
    for part in output.split("<|assistant|>"):
        metadata, sep, content = part.partition("\n")
        if not sep:
            metadata, content = "", part
        if not metadata.strip():
            content = content.strip()
            new_history.append({"role": "assistant", "metadata": metadata, "content": content})
            response = content.replace(TRAINING_TIME_PLACEHOLDER, TRAINING_TIME_VALUE)
            continue
        new_history.append({"role": "assistant", "metadata": metadata, "content": content})
        name = metadata.strip()
        if with_tools:
            try:
                response = {"name": name, "parameters": parse_tool_call(content)}
            except ToolCallError as err:
                response = {"name": name, "content": content, "parse_error": str(err)}
        else:
            response = {"name": name, "content": content}
    return response, new_history


def process_chatglm2_response(output: str) -> str:
    """A ChatGLM2 reply as shown to the user: stripped, ``[[训练时间]]`` replaced by ``2023年``."""
    _check_text(output, "model output")
    return output.strip().replace(TRAINING_TIME_PLACEHOLDER, TRAINING_TIME_VALUE)


# --------------------------------------------------------------------------------------------------------------
# Chat templates (Jinja) and the markup they produce
# --------------------------------------------------------------------------------------------------------------
#
# The templates write control tokens (``[gMASK]sop`` at the very start, ``<|role|>`` before each message) and
# escape every string that comes from the caller, so that no caller text contains ``<|``. The tokenizer reads the
# rendered text in "markup" mode (only inside ``apply_chat_template`` and ``encode_chat_markup``): control tokens
# written by the template become ids, each message is split at its first newline into ``metadata + "\n"`` and
# content (encoded separately, exactly like ``build_chat_input``), and the escape is undone before encoding.
# A template announces its dialect with the comment ``{#- chatglm-markup: <family> -#}``.

#: Private-use character that escapes ``<|`` in caller text: ``E`` -> ``EE``, ``<|`` -> ``<E|``.
MARKUP_ESCAPE = "\ue000"
_MARKUP_TAG = "chatglm-markup:"


def escape_markup(text: str) -> str:
    """Escape caller text for ChatGLM3 markup: the result never contains ``<|``."""
    return text.replace(MARKUP_ESCAPE, MARKUP_ESCAPE * 2).replace("<|", "<" + MARKUP_ESCAPE + "|")


def unescape_markup(text: str) -> str:
    """Inverse of :func:`escape_markup` (``EE`` -> ``E``, a lone ``E`` is dropped)."""
    if MARKUP_ESCAPE not in text:
        return text
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch == MARKUP_ESCAPE:
            if i + 1 < len(text) and text[i + 1] == MARKUP_ESCAPE:
                out.append(MARKUP_ESCAPE)
                i += 2
                continue
            i += 1
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def markup_dialect(template: Any) -> Optional[str]:
    """The family a chat template declares with ``{#- chatglm-markup: <family> -#}``, or None."""
    if not isinstance(template, str):
        return None
    start = template.find(_MARKUP_TAG)
    if start < 0:
        return None
    word = template[start + len(_MARKUP_TAG):].split()[0] if template[start + len(_MARKUP_TAG):].split() else ""
    return word if word in FAMILIES else None


_ESC_J = "\\ue000"  # the escape character, written as a Jinja string escape

CHATGLM3_TEMPLATE = "".join(
    [
        "{#- chatglm-markup: chatglm3 (role tokens come only from this template; caller text is escaped) -#}",
        "{%- macro glm_escape(s) -%}",
        "{{- s | replace('" + _ESC_J + "', '" + _ESC_J + _ESC_J + "') | replace('<|', '<" + _ESC_J + "|') -}}",
        "{%- endmacro -%}",
        "{%- set ns = namespace(tools=none) -%}",
        "{%- if tools is defined and tools is not none and tools | length > 0 -%}",
        "{%- set ns.tools = [] -%}",
        "{%- for t in tools -%}",
        "{%- set ns.tools = ns.tools + [t['function'] if (t is mapping and t['function'] is defined) else t] -%}",
        "{%- endfor -%}",
        "{%- endif -%}",
        "[gMASK]sop",
        "{%- if ns.tools is not none and messages[0]['role'] != 'system' -%}",
        "{{- '<|system|>\\n' ~ glm_escape('\\n' ~ (ns.tools | tojson(indent=4))) -}}",
        "{%- endif -%}",
        "{%- for message in messages -%}",
        "{%- set role = message['role'] -%}",
        "{%- if role not in ['system', 'user', 'assistant', 'observation'] -%}",
        "{{- raise_exception('unknown role ' ~ role ~ ': ChatGLM3 roles are system, user, assistant, observation') -}}",
        "{%- endif -%}",
        "{%- if message['content'] is not string -%}",
        "{{- raise_exception('message content must be a string (role ' ~ role ~ ')') -}}",
        "{%- endif -%}",
        "{%- set metadata = message['metadata'] if (message['metadata'] is defined and message['metadata'] is not none) else '' -%}",
        "{%- if metadata is not string or '\\n' in metadata -%}",
        "{{- raise_exception('metadata must be a single line of text') -}}",
        "{%- endif -%}",
        "{%- set content = message['content'] -%}",
        "{%- if message['tools'] is defined and message['tools'] is not none -%}",
        "{%- if role != 'system' -%}{{- raise_exception('tools belong on the system message') -}}{%- endif -%}",
        "{%- set content = content ~ '\\n' ~ (message['tools'] | tojson(indent=4)) -%}",
        "{%- elif loop.first and role == 'system' and ns.tools is not none -%}",
        "{%- set content = content ~ '\\n' ~ (ns.tools | tojson(indent=4)) -%}",
        "{%- endif -%}",
        "{{- '<|' ~ role ~ '|>' ~ glm_escape(metadata) ~ '\\n' ~ glm_escape(content) -}}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}",
    ]
)

CHATGLM2_TEMPLATE = "".join(
    [
        "{#- chatglm-markup: chatglm2 (prompt [Round N] 问/答; only the leading [gMASK]sop is a control token) -#}",
        "[gMASK]sop",
        "{%- for message in messages -%}",
        "{%- if message['content'] is not string -%}",
        "{{- raise_exception('message content must be a string') -}}",
        "{%- endif -%}",
        "{%- if loop.index0 % 2 == 0 -%}",
        "{%- if message['role'] != 'user' -%}",
        "{{- raise_exception('ChatGLM2 conversations alternate user and assistant messages, starting with user; got '"
        " ~ message['role'] ~ ' at position ' ~ loop.index0) -}}",
        "{%- endif -%}",
        "{{- '[Round ' ~ (loop.index0 // 2 + 1) ~ ']\\n\\n问：' ~ message['content'] ~ '\\n\\n答：' -}}",
        "{%- else -%}",
        "{%- if message['role'] != 'assistant' -%}",
        "{{- raise_exception('ChatGLM2 conversations alternate user and assistant messages; got '"
        " ~ message['role'] ~ ' at position ' ~ loop.index0) -}}",
        "{%- endif -%}",
        "{{- message['content'] -}}",
        "{%- if not loop.last -%}{{- '\\n\\n' -}}{%- endif -%}",
        "{%- endif -%}",
        "{%- endfor -%}",
    ]
)


def chat_template(family: str) -> str:
    """The Jinja chat template of ``family`` (the one in this package's tokenizer_config.json files)."""
    return CHATGLM3_TEMPLATE if check_family(family) == CHATGLM3 else CHATGLM2_TEMPLATE
