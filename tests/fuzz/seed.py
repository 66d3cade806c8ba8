#!/usr/bin/env python3
"""Seeds each fuzz target's corpus (tests/fuzz/corpus/<target>/) from docs/test-vectors.json and
the commands of docs/PROTOCOL.md, so the fuzzers start from messages the server understands."""
import base64, hashlib, hmac, json, os, sys

root = os.path.dirname(os.path.abspath(__file__))
vectors = json.load(open(os.path.join(root, "..", "..", "docs", "test-vectors.json")))
corpus = {}

def add(target, data):
    if isinstance(data, str):
        data = data.encode()
    corpus.setdefault(target, []).append(data)

for text in [
    '{"type":"subscribe","room":"game:1234"}',
    '{"type":"subscribe","room":"bracket:77","since":41,"epoch":"3f9c0a51d2e4b771","id":7}',
    '{"type":"unsubscribe","room":"game:1234"}',
    '{"type":"ping"}',
    '{"type":"auth","token":"eyJhbGciOiJIUzI1NiJ9.e30.x"}',
]:
    add("websocket_command", text)
for vector in vectors["websocket"]:
    add("websocket_command", vector["text"])

for vector in vectors["webtransport"]["messages"] + vectors["webtransport"].get("accepted", []):
    message = bytes.fromhex(vector["hex"])
    add("webtransport_message", message)
    add("redis_envelope", message)
for vector in vectors["webtransport"]["framing"]:
    stream = bytes.fromhex(vector["stream_hex"])
    for split in (1, 3, 7, 255):
        add("webtransport_framing", bytes([split]) + stream)

for vector in vectors["fossil"]:
    base, target = vector["base"].encode(), vector["target"].encode()
    add("fossil_delta", bytes([len(base) * 255 // max(1, len(base) + len(target))]) + base + target)
for vector in vectors["fossil_bad"]:
    add("fossil_delta", bytes([128]) + vector["base"].encode() + vector["delta"].encode())

for body in [
    '{"home":42,"away":40}',
    '"semifinal"',
    '{"messages":[{"room":"game:1","type":"state","data":{"home":1}},'
    '{"room":"game:1","type":"event","data":"goal","idempotency_key":"k-1"}]}',
    '{"messages":[{"room":"user:5","type":"event","data":1}]}',
]:
    add("publish_body", body)

def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=")

def hs256(claims, secret=b"fuzz-secret"):
    signing = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + b"." + b64(json.dumps(claims).encode())
    return signing + b"." + b64(hmac.new(secret, signing, hashlib.sha256).digest())

add("token", hs256({"sub": "55", "exp": 4102444800, "iss": "platform", "aud": "courtside", "rooms": ["league:*"]}))
add("token", hs256({"sub": "55", "exp": 1}))

# The HTTP/3 CONNECT a browser sends (HEADERS frame, QPACK literals) is built by the h3 unit
# tests; a frame header and a stream-type prefix start the fuzzer off.
add("h3_connect", bytes.fromhex("0104000050"))
add("h3_connect", bytes.fromhex("4054000100"))
# A client's SETTINGS (after its control stream's type byte): H3_DATAGRAM 1, WebTransport on.
add("h3_connect", bytes.fromhex("04103301ab60374201c0000000c671706a01"))

# permessage-deflate: a browser's offer, and a compressed subscribe in one masked frame (split
# byte 7 first): "Hello" of RFC 7692 §7.2.3.1 as a text frame, masked with 37 fa 21 3d.
add("websocket_deflate", "permessage-deflate; client_max_window_bits")
hello = bytes.fromhex("f248cdc9c90700")
mask = bytes.fromhex("37fa213d")
add("websocket_deflate", bytes([7, 0xc1, 0x80 | len(hello)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(hello)))

for target, items in corpus.items():
    directory = os.path.join(root, "corpus", target)
    os.makedirs(directory, exist_ok=True)
    for data in items:
        name = hashlib.sha1(data).hexdigest()
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
print("seeded " + ", ".join(f"{t} ({len(i)})" for t, i in sorted(corpus.items())), file=sys.stderr)
