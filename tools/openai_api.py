"""An OpenAI-compatible chat server for ChatGLM2 / ChatGLM3, on Python's standard library (no web framework).

    python tools/openai_api.py --model /path/to/chatglm3-6b [--port 8000] [--quantize 4] [--finetuned OUT]
    curl localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "你好"}], "stream": true}'

Endpoints: `GET /v1/models` and `POST /v1/chat/completions`, streamed (server-sent events) or not. Request fields:
`messages` (system / user / assistant, with `tool_calls` / tool), `tools` (ChatGLM3 function tools), `stream`,
`stream_options.include_usage`, `max_tokens`, `temperature` (0: greedy), `top_p`, `stop`, `seed`, and
`repetition_penalty` (not OpenAI's, but what ChatGLM clients send). `n` must be 1; OpenAI's frequency and presence
penalties are not supported and must be 0 or absent. A ChatGLM3 tool call comes back as `tool_calls` with JSON
arguments (parsed without eval); a tool result goes back as a `tool` message (the model's observation turn).

Requests decode in batches: one worker runs `model.stream_batch_chat` over the requests waiting with the same
sampling settings (up to `--max-batch`, each with its own max_tokens and stop strings), so on CUDA the fast decode
path serves them together; a request with a seed decodes alone (it repeats). `usage` counts the exact tokens.
"""
from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cli_demo import add_model_arguments, load  # noqa: E402  (it also makes our modules importable as package `chatglm`)
from finetune import chat_family  # noqa: E402

MAX_BODY_BYTES = 16 * 2**20
NUMERIC_FIELDS = {"max_tokens": ("max_new_tokens", int), "max_completion_tokens": ("max_new_tokens", int),
                  "top_p": ("top_p", float), "repetition_penalty": ("repetition_penalty", float),
                  "seed": ("seed", int)}  # request field → (setting, type)
TOOLS_SYSTEM_PROMPT = "You can call the following tools when they help to answer:"


class RequestError(ValueError):
    """A request the server refuses with HTTP 400; the message says what to change."""


# -------------------------------------------------------------------------------------------- messages
def _text(content: Any, where: str) -> str:
    """A message's content: a string, or OpenAI's list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise RequestError(f"{where}: content must be a string or a list of text parts")


def _call_text(arguments: str) -> str:
    """A tool call as the ChatGLM3 model writes it, from OpenAI's JSON arguments."""
    try:
        parsed = json.loads(arguments)
    except (TypeError, json.JSONDecodeError):
        return str(arguments)
    if not isinstance(parsed, dict):
        return arguments
    return "```python\ntool_call(" + ", ".join(f"{key}={value!r}" for key, value in parsed.items()) + ")\n```"


def chatglm3_conversation(messages: List[Mapping[str, Any]], tools: Optional[List[Any]]
                          ) -> Tuple[str, str, List[Dict[str, Any]]]:
    """OpenAI messages (and tools) → (query, role, history) for a ChatGLM3 ``chat``."""
    functions = []
    for i, tool in enumerate(tools or []):
        if not isinstance(tool, Mapping) or tool.get("type") != "function" or not isinstance(tool.get("function"),
                                                                                              Mapping):
            raise RequestError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}")
        functions.append(dict(tool["function"]))
    history: List[Dict[str, Any]] = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role == "system":
            history.append({"role": "system", "content": _text(message.get("content"), f"messages[{i}]")})
        elif role == "user":
            history.append({"role": "user", "content": _text(message.get("content"), f"messages[{i}]")})
        elif role == "tool":
            history.append({"role": "observation", "content": _text(message.get("content"), f"messages[{i}]")})
        elif role == "assistant":
            calls = message.get("tool_calls") or []
            if message.get("content") or not calls:
                history.append({"role": "assistant", "content": _text(message.get("content") or "", f"messages[{i}]")})
            for call in calls:
                function = call.get("function") if isinstance(call, Mapping) else None
                if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
                    raise RequestError(f"messages[{i}].tool_calls: each call needs function.name")
                history.append({"role": "assistant", "metadata": function["name"],
                                "content": _call_text(function.get("arguments", "{}"))})
        else:
            raise RequestError(f"messages[{i}] has role {role!r}; use system, user, assistant or tool")
    if functions:
        system = next((m for m in history if m["role"] == "system"), None)
        if system is None:
            history.insert(0, {"role": "system", "content": TOOLS_SYSTEM_PROMPT})
            system = history[0]
        system["tools"] = functions
    last = history.pop()
    if last["role"] not in ("user", "observation"):
        raise RequestError("the last message must be from the user or a tool: the model writes the next one")
    return last["content"], last["role"], history


def chatglm2_conversation(messages: List[Mapping[str, Any]], tools: Optional[List[Any]]
                          ) -> Tuple[str, str, List[List[str]]]:
    """OpenAI messages → (query, "user", history of [query, response] pairs) for a ChatGLM2 ``chat``."""
    if tools:
        raise RequestError("tools need a ChatGLM3 model")
    roles = [m.get("role") for m in messages]
    if roles != ["user", "assistant"] * (len(roles) // 2) + ["user"]:
        raise RequestError(f"ChatGLM2 takes alternating user and assistant messages ending with the user "
                           f"(no system or tool roles), got {roles}")
    texts = [_text(m.get("content"), f"messages[{i}]") for i, m in enumerate(messages)]
    return texts[-1], "user", [[texts[i], texts[i + 1]] for i in range(0, len(texts) - 1, 2)]


def message_for(response: Any) -> Tuple[Dict[str, Any], Optional[str]]:
    """The assistant message of a chat response → (message, "tool_calls" when it is a call, else None)."""
    if isinstance(response, str):
        return {"role": "assistant", "content": response}, None
    if "parameters" in response:
        call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": response["name"], "arguments": json.dumps(response["parameters"],
                                                                               ensure_ascii=False)}}
        return {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"
    return {"role": "assistant", "content": response.get("content", "")}, None


# --------------------------------------------------------------------------------------------- service
class _Job:
    """One request: its conversation and settings, waiting for a batch or in one; its handler reads `events`."""

    def __init__(self, query: str, role: str, history: List[Any], settings: Dict[str, Any], stops: List[str],
                 prompt_tokens: int, streamable: bool, seed: Optional[int]):
        self.query, self.role, self.history, self.settings = query, role, history, settings
        self.stops, self.prompt_tokens, self.streamable, self.seed = stops, prompt_tokens, streamable, seed
        self.events: "queue.Queue[Tuple[str, Any]]" = queue.Queue()
        self.sent, self.done, self.cancelled = "", False, False

    def batch_key(self) -> Optional[tuple]:
        """Jobs with equal keys decode together (the same sampling settings); None: alone (a seed)."""
        if self.seed is not None:
            return None
        return tuple(sorted((k, v) for k, v in self.settings.items() if k != "max_new_tokens"))

    def advance(self, reply: Any) -> None:
        """Take the job's row of a `stream_batch_chat` step: send the new text, and the end once the reply has
        finished or reached a stop string."""
        response, stopped = reply.response, False
        if isinstance(response, str):
            cut = min((response.find(s) for s in self.stops if s in response), default=-1)
            if cut >= 0:
                response, stopped = response[:cut], True
            if self.streamable and response.startswith(self.sent) and len(response) > len(self.sent):
                self.events.put(("delta", response[len(self.sent):]))
                self.sent = response
        if stopped or reply.finish:
            finish = "stop" if stopped or reply.finish == "stop" else "length"
            usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": reply.tokens,
                     "total_tokens": self.prompt_tokens + reply.tokens}
            self.events.put(("end", (response, finish, usage)))
            self.done = True


class ChatService:
    """Turns chat-completion requests into ``stream_batch_chat`` calls on one model.

    One worker thread generates; requests that arrive while it is busy (or within `batch_wait` seconds of each
    other) and share their sampling settings decode together, up to `max_batch` rows (on CUDA the fused step serves
    up to 16). A request with a seed decodes alone, so it repeats.
    """

    def __init__(self, model: Any, tokenizer: Any, name: str, max_batch: int = 8, batch_wait: float = 0.005):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.max_batch, self.batch_wait = max_batch, batch_wait
        self.family = chat_family(tokenizer)
        self.pending: List[_Job] = []
        self.ready = threading.Condition()
        self.worker: Optional[threading.Thread] = None

    def _settings(self, request: Mapping[str, Any]) -> Dict[str, Any]:
        if request.get("n", 1) != 1:
            raise RequestError("n must be 1")
        for name in ("frequency_penalty", "presence_penalty"):
            if request.get(name):
                raise RequestError(f"{name} is not supported; use repetition_penalty (e.g. 1.1)")
        settings: Dict[str, Any] = {}
        for key, (target, kind) in NUMERIC_FIELDS.items():
            if request.get(key) is not None:
                if not isinstance(request[key], (int, float)) or isinstance(request[key], bool):
                    raise RequestError(f"{key} must be a number")
                settings[target] = kind(request[key])
        if settings.get("max_new_tokens", 1) < 1:
            raise RequestError("max_tokens must be at least 1")
        temperature = request.get("temperature")
        if temperature is not None:
            if not isinstance(temperature, (int, float)) or temperature < 0:
                raise RequestError("temperature must be a number ≥ 0")
            if temperature == 0:
                settings["do_sample"] = False
            else:
                settings["temperature"] = float(temperature)
        return settings

    def complete(self, request: Mapping[str, Any]) -> Iterator[Tuple[str, Any]]:
        """Yield ("delta", text) as the reply grows (plain replies only), then ("end", (response, finish_reason,
        usage)). RequestError for a request that cannot be served."""
        messages = request.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, Mapping) for m in messages):
            raise RequestError("messages must be a non-empty list of {'role', 'content'} objects")
        convert = chatglm3_conversation if self.family == "chatglm3" else chatglm2_conversation
        query, role, history = convert(messages, request.get("tools"))
        settings = self._settings(request)
        seed = settings.pop("seed", None)
        stops = request.get("stop") or []
        stops = [stops] if isinstance(stops, str) else stops
        if not all(isinstance(s, str) and s for s in stops):
            raise RequestError("stop must be a string or a list of non-empty strings")
        try:
            prompt_tokens = len(self.tokenizer.build_chat_input(query, history, role=role)["input_ids"][0])
        except ValueError as err:
            raise RequestError(str(err)) from None
        job = _Job(query, role, history, settings, stops, prompt_tokens, not request.get("tools"), seed)
        with self.ready:
            self.pending.append(job)
            if self.worker is None:
                self.worker = threading.Thread(target=self._serve, name="chatglm-openai-batches", daemon=True)
                self.worker.start()
            self.ready.notify()
        try:
            while True:
                kind, value = job.events.get()
                if kind == "error":
                    raise value
                yield kind, value
                if kind == "end":
                    return
        finally:  # the client went away, or the reply is complete: its row need not be decoded any more
            job.cancelled = True

    def _serve(self) -> None:
        while True:
            with self.ready:
                while not self.pending:
                    self.ready.wait()
                # requests sent together arrive a little apart: wait while they keep coming (batch_wait after the
                # last one, 10 x batch_wait at most), so a burst decodes as one batch
                deadline, seen = time.monotonic() + 10 * self.batch_wait, 0
                while seen < len(self.pending) < self.max_batch and time.monotonic() < deadline:
                    seen = len(self.pending)
                    self.ready.wait(self.batch_wait)
                batch = self._take_batch()
            if batch:
                self._run(batch)

    def _take_batch(self) -> List[_Job]:
        """The oldest waiting job and, up to max_batch, the next ones that decode with it (taken off the queue)."""
        self.pending = [job for job in self.pending if not job.cancelled]
        if not self.pending:
            return []
        key = self.pending[0].batch_key()
        batch = [job for job in self.pending if key is not None and job.batch_key() == key][:self.max_batch] \
            or self.pending[:1]
        self.pending = [job for job in self.pending if job not in batch]
        return batch

    def _run(self, batch: List[_Job]) -> None:
        try:
            if batch[0].seed is not None:
                torch.manual_seed(batch[0].seed)
            self._generate(batch)
        except ValueError as err:  # too long a conversation, a setting the model refuses
            if len(batch) > 1 and not any(job.sent or job.done for job in batch):
                for job in batch:  # find the request it was, so the others still get their replies
                    self._run([job])
                return
            for job in batch:
                if not job.done:
                    job.events.put(("error", RequestError(str(err))))
        except Exception as err:  # noqa: BLE001  (reported to the clients as 500s, the server keeps serving)
            for job in batch:
                if not job.done:
                    job.events.put(("error", err))

    def _generate(self, batch: List[_Job]) -> None:
        settings = {k: v for k, v in batch[0].settings.items() if k != "max_new_tokens"}
        # batches are padded to a power of two with copies of the last request (replies not read; the rows of a
        # batch do not affect each other), so the decoder, its kernels and CUDA graphs exist for a few sizes only
        rows = batch + batch[-1:] * (min(1 << (len(batch) - 1).bit_length(), max(self.max_batch, len(batch)))
                                     - len(batch))
        steps = self.model.stream_batch_chat(self.tokenizer, [job.query for job in rows],
                                             [job.history for job in rows], role=[job.role for job in rows],
                                             max_new_tokens=[job.settings.get("max_new_tokens") for job in rows],
                                             **settings)
        try:
            for replies in steps:
                for job, reply in zip(batch, replies):
                    if job.cancelled and not job.done:
                        job.done = True
                    if not job.done:
                        job.advance(reply)
                if all(job.done for job in batch):
                    break
        finally:
            steps.close()


# ------------------------------------------------------------------------------------------------ HTTP
class Handler(BaseHTTPRequestHandler):
    service: ChatService  # set on the subclass make_server builds
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (the base class's name)
        sys.stderr.write(f"{self.address_string()} {format % args}\n")

    def _json(self, status: int, body: Mapping[str, Any]) -> None:
        data = json.dumps(body, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        self._json(status, {"error": {"message": message, "type": kind}})

    def do_GET(self) -> None:  # noqa: N802  (the base class's name)
        if self.path.rstrip("/") == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": self.service.name, "object": "model",
                                                          "owned_by": "local"}]})
        else:
            self._error(404, f"no such endpoint: GET {self.path}")

    def do_POST(self) -> None:  # noqa: N802
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._error(404, f"no such endpoint: POST {self.path}")
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            return self._error(413, f"request body over {MAX_BODY_BYTES} bytes")
        try:
            request = json.loads(self.rfile.read(length) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return self._error(400, f"the body is not JSON: {err}")
        if not isinstance(request, dict):
            return self._error(400, "the body must be a JSON object")
        events = self.service.complete(request)
        try:
            first = next(events)  # a RequestError surfaces here, before any byte is sent
        except RequestError as err:
            return self._error(400, str(err))
        except Exception as err:  # noqa: BLE001  (report, keep serving)
            return self._error(500, f"{type(err).__name__}: {err}", "server_error")
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.service.name}
        if request.get("stream"):
            self._stream(head, first, events, bool((request.get("stream_options") or {}).get("include_usage")))
        else:
            for first in events:  # the last event is the end
                pass
            response, finish, usage = first[1]
            message, call_finish = message_for(response)
            self._json(200, {**head, "object": "chat.completion", "usage": usage,
                             "choices": [{"index": 0, "message": message, "finish_reason": call_finish or finish}]})

    def _stream(self, head: Dict[str, Any], first: Tuple[str, Any], events: Iterator[Tuple[str, Any]],
                include_usage: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def send(delta: Dict[str, Any], finish: Optional[str] = None, **extra: Any) -> None:
            chunk = {**head, "object": "chat.completion.chunk", **extra,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            self.wfile.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())
            self.wfile.flush()

        send({"role": "assistant", "content": ""})
        event, sent = first, ""
        while event[0] == "delta":
            send({"content": event[1]})
            sent += event[1]
            event = next(events)
        response, finish, usage = event[1]
        message, call_finish = message_for(response)
        if call_finish:
            send({"tool_calls": [{"index": 0, **message["tool_calls"][0]}]})
        elif message["content"].startswith(sent) and len(message["content"]) > len(sent):
            send({"content": message["content"][len(sent):]})  # what was not streamed: replies to tool requests
        send({}, call_finish or finish)
        if include_usage:
            chunk = {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage}
            self.wfile.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def make_server(service: ChatService, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """An HTTP server for ``service`` (``port`` 0 picks a free one); call ``serve_forever()`` on it."""
    handler = type("ChatHandler", (Handler,), {"service": service})
    return ThreadingHTTPServer((host, port), handler)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--name", default=None, help="the model id clients see (default: the folder name)")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=int, default=8,
                        help="requests decoded together at most (1: one at a time; the fused CUDA step takes 16)")
    args = parser.parse_args(argv)
    model, tokenizer = load(args)
    service = ChatService(model, tokenizer, args.name or Path(args.model).resolve().name, max_batch=args.max_batch)
    server = make_server(service, args.host, args.port)
    print(f"serving {args.model} on http://{args.host}:{server.server_address[1]}/v1", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
