"""Runs an engine's own KV event publisher, unchanged, for the conformance tests.

The engine's `kv_events` module is read straight out of its released wheel
(downloaded by scripts/setup into .data/engine-wheels, never committed) and
executed with the rest of the engine package replaced by stubs: the module
only needs msgspec, pyzmq (and pydantic for SGLang's config model), which are
real, plus a few names from its own package (a logger factory, a config
class, type aliases), which are stubbed. Its `ZmqEventPublisher` then binds a
real PUB socket and a real replay ROUTER exactly as inside the engine.

Protocol: one JSON object per line on stdin, one JSON answer per line on
stdout. The first line written is `{"ready": true, "capabilities": {...}}`.

  {"op": "publish", "drop": false, "events": [EVENT, ...]}
      publishes one batch through the engine's publisher and answers
      {"seq": N} once the publisher thread has sent it. With "drop": true the
      PUB frame is discarded on its way to the socket (as a ZMQ high-water
      mark would) while the engine still buffers the batch for replay.
  {"op": "publish_garbage", "level": "event"|"batch", "drop": true}
      publishes a batch whose only event has a malformed field ("event"), or
      whose event list is not a list ("batch").
  {"op": "quit"}

EVENT is engine-neutral:
  {"kind": "stored", "hashes": [u64], "parent": u64|null, "tokens": [int],
   "block_size": int, "salt": str|null, "mm": str|null, "group": int|null,
   "group_kind": str|null}
  {"kind": "removed", "hashes": [u64], "group": int|null}
  {"kind": "cleared"}
Hashes are mapped to the engine's wire type (`--hash-style`): signed i64
(SGLang, vLLM with Python's hash()), unsigned u64, or 32 bytes (vLLM's sha256
modes).
"""

import argparse
import importlib.abc
import importlib.util
import json
import logging
import sys
import threading
import time
import types
import zipfile

MODULE_PATHS = {
    "vllm": "vllm/distributed/kv_events.py",
    "sglang": "sglang/srt/disaggregation/kv_events.py",
}


class _Stub:
    """Stands in for any class of the engine package the module imports."""

    def __init__(self, *args, **kwargs):
        self.__dict__.update(kwargs)


# Names whose stub must behave like the real thing for the publisher to run.
_SPECIAL_NAMES = {
    "init_logger": logging.getLogger,
    "ExternalBlockHash": int | bytes,
}


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _SPECIAL_NAMES.get(name) or type(name, (_Stub,), {})
        setattr(self, name, value)
        return value


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves every module of `package` (except the one executed) as a stub."""

    def __init__(self, package):
        self.package = package

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.package or fullname.startswith(self.package + "."):
            return importlib.util.spec_from_loader(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def load_kv_events(wheel, engine):
    member = MODULE_PATHS[engine]
    with zipfile.ZipFile(wheel) as archive:
        source = archive.read(member).decode("utf-8")
    sys.meta_path.insert(0, _StubFinder(engine))
    name = member[: -len(".py")].replace("/", ".")
    module = types.ModuleType(name)
    module.__file__ = f"{wheel}!/{member}"
    sys.modules[name] = module
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def fields_of(cls):
    return set(getattr(cls, "__struct_fields__", ()))


class Engine:
    def __init__(self, module, engine, hash_style):
        self.m = module
        self.engine = engine
        self.hash_style = hash_style
        self.stored_fields = fields_of(module.BlockStored)
        self.removed_fields = fields_of(module.BlockRemoved)
        with_metadata = getattr(module, "BlockStoredWithMetadata", None)
        self.salt_via_metadata = (
            with_metadata is not None and "metadata" in fields_of(with_metadata)
        )
        self.capabilities = {
            "salt": "extra_keys" in self.stored_fields
            or "cache_salt" in self.stored_fields
            or self.salt_via_metadata,
            "mm": "extra_keys" in self.stored_fields,
            "groups": "group_idx" in self.stored_fields,
        }

    def wire_hash(self, value):
        if value is None:
            return None
        if self.hash_style == "signed":
            return value - (1 << 64) if value >= 1 << 63 else value
        if self.hash_style == "bytes":
            return value.to_bytes(8, "big") * 4
        return value

    def stored(self, e):
        salt, mm = e.get("salt"), e.get("mm")
        hashes = [self.wire_hash(h) for h in e["hashes"]]
        values = {
            "block_hashes": hashes,
            "parent_block_hash": self.wire_hash(e.get("parent")),
            "token_ids": e["tokens"],
            "block_size": e["block_size"],
            "lora_id": None,
            "medium": "GPU",
            "lora_name": None,
            "group_idx": e.get("group"),
            "kv_cache_spec_kind": e.get("group_kind"),
        }
        if "extra_keys" in self.stored_fields and (salt or mm):
            # vLLM's published (untagged) shape: per block a tuple holding
            # (mm_identifier, offset) pairs, then the salt on the first block
            # of a prompt only.
            keys = []
            for i in range(len(hashes)):
                entry = []
                if mm:
                    entry.append((mm, 0))
                if salt and i == 0 and e.get("parent") is None:
                    entry.append(salt)
                keys.append(tuple(entry) or None)
            values["extra_keys"] = keys
        cls = self.m.BlockStored
        if salt and "cache_salt" in self.stored_fields:
            values["cache_salt"] = salt
        elif salt and self.salt_via_metadata:
            cls = self.m.BlockStoredWithMetadata
            values["metadata"] = self.m.BlockStoredMetadata(cache_salt=salt)
        allowed = fields_of(cls)
        return cls(**{k: v for k, v in values.items() if k in allowed})

    def removed(self, e):
        values = {
            "block_hashes": [self.wire_hash(h) for h in e["hashes"]],
            "medium": "GPU",
            "group_idx": e.get("group"),
        }
        return self.m.BlockRemoved(
            **{k: v for k, v in values.items() if k in self.removed_fields}
        )

    def event(self, e):
        kind = e["kind"]
        if kind == "stored":
            return self.stored(e)
        if kind == "removed":
            return self.removed(e)
        if kind == "cleared":
            return self.m.AllBlocksCleared()
        raise ValueError(f"unknown event kind {kind!r}")

    def batch(self, events):
        return self.m.KVEventBatch(ts=time.time(), events=events)


class DroppingSocket:
    """Wraps the publisher's PUB socket; drops the frames it is told to."""

    def __init__(self, inner):
        self.inner = inner
        self.drop_next = False
        self.sent = threading.Condition()
        self.count = 0

    def send_multipart(self, frames, *args, **kwargs):
        drop, self.drop_next = self.drop_next, False
        if not drop:
            self.inner.send_multipart(frames, *args, **kwargs)
        with self.sent:
            self.count += 1
            self.sent.notify_all()

    def __getattr__(self, name):
        return getattr(self.inner, name)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", required=True)
    parser.add_argument("--engine", choices=sorted(MODULE_PATHS), required=True)
    parser.add_argument("--pub-port", type=int, required=True)
    parser.add_argument("--replay-port", type=int, required=True)
    parser.add_argument("--topic", default="kv-events")
    parser.add_argument("--hash-style", choices=["signed", "unsigned", "bytes"], required=True)
    # The engine's own publisher binds the ports plus the rank and stamps
    # every batch with it, as each data-parallel rank of an engine does.
    parser.add_argument("--data-parallel-rank", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    module = load_kv_events(args.wheel, args.engine)
    engine = Engine(module, args.engine, args.hash_style)
    publisher = module.ZmqEventPublisher(
        args.data_parallel_rank,
        endpoint=f"tcp://*:{args.pub_port}",
        replay_endpoint=f"tcp://127.0.0.1:{args.replay_port}",
        topic=args.topic,
    )
    socket = DroppingSocket(publisher._pub)
    publisher._pub = socket

    def reply(obj):
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply({"ready": True, "capabilities": engine.capabilities})
    published = 0
    for line in sys.stdin:
        command = json.loads(line)
        op = command["op"]
        if op == "quit":
            break
        if op == "publish":
            events = [engine.event(e) for e in command["events"]]
        elif op == "publish_garbage" and command["level"] == "event":
            # A known tag with a field of the wrong type.
            events = [{"type": "BlockStored", "block_hashes": "not a list"}]
        elif op == "publish_garbage":
            events = "not a list"
        else:
            raise ValueError(f"unknown op {op!r}")
        with socket.sent:
            socket.drop_next = bool(command.get("drop"))
            publisher.publish(engine.batch(events))
            if not socket.sent.wait_for(lambda: socket.count > published, timeout=10):
                raise TimeoutError("the publisher thread did not send the batch")
        reply({"seq": published})
        published += 1
    publisher.shutdown()


if __name__ == "__main__":
    main()
