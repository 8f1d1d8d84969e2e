from __future__ import annotations
import pytest
from tests.conftest import BrokerUnderTest, RecordingUpstream
from tests.certfactory import client_ssl_context
from tests.security import rawhttp

TOOL = "/v1/tools/approveExpense"
BODY = b'{"invoice_id":"INV-1","amount":1}'

CASES = {
 "ok": "Content-Length: {n}\r\n\r\n{b}",
 "p01": "Content-Length: {n}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
 "p02x": "Transfer-Encoding: xchunked\r\n\r\n{hex}\r\n{b}\r\n0\r\n\r\n",
 "p02ci": "Transfer-Encoding: chunked, identity\r\n\r\n{hex}\r\n{b}\r\n0\r\n\r\n",
 "p02sp": "Transfer-Encoding:  chunked\r\n\r\n{hex}\r\n{b}\r\n0\r\n\r\n",
 "p02tab": "Transfer-Encoding:\tchunked\r\n\r\n{hex}\r\n{b}\r\n0\r\n\r\n",
 "p02tabin": "Transfer-Encoding: chunked\t,x\r\n\r\n{hex}\r\n{b}\r\n0\r\n\r\n",
 "p02dup": "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n{hex}\r\n{b}\r\n0\r\n\r\n",
 "p02dup2": "Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n\r\n{hex}\r\n{b}\r\n0\r\n\r\n",
 "p03": "X-Abc: \rxTransfer-Encoding: chunked\r\nContent-Length: {n}\r\n\r\n{b}",
 "p04ext": "Transfer-Encoding: chunked\r\n\r\n{hex};a=\nb\r\n{b}\r\n0\r\n\r\n",
 "p04trailer": "Transfer-Encoding: chunked\r\n\r\n{hex}\r\n{b}\r\n0\r\nX-T: a\nContent-Length: 5\r\n\r\n",
 "p04trailer2": "Transfer-Encoding: chunked\r\n\r\n{hex}\r\n{b}\r\n0\r\nTransfer-Encoding: chunked\r\n\r\n",
 "p05sp": "Transfer-Encoding : chunked\r\n\r\n{hex}\r\n{b}\r\n0\r\n\r\n",
 "p05fold": "X-Fold: a\r\n b\r\nContent-Length: {n}\r\n\r\n{b}",
 "p05plus": "Content-Length: +{n}\r\n\r\n{b}",
 "p05dup": "Content-Length: {n}, {n}\r\n\r\n{b}",
 "p05dupl": "Content-Length: {n}\r\nContent-Length: {n}\r\n\r\n{b}",
 "p05hex": "Content-Length: 0x{hex}\r\n\r\n{b}",
 "p05neg": "Content-Length: -{n}\r\n\r\n{b}",
 "p06": "Connection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: {n}\r\n\r\n{b}",
}

@pytest.mark.parametrize("case", list(CASES))
async def test_probe(broker: BrokerUnderTest, upstream: RecordingUpstream, case: str) -> None:
    caller = broker.caller()
    auth = caller.auth_headers("POST", TOOL)
    head = f"POST {TOOL} HTTP/1.1\r\nHost: localhost\r\nAuthorization: {auth['Authorization']}\r\nDPoP: {auth['DPoP']}\r\nContent-Type: application/json\r\n"
    tail = CASES[case].format(n=len(BODY), b=BODY.decode(), hex=format(len(BODY), 'x'))
    smuggled = f"POST {TOOL} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n"
    data = (head + tail).encode() + smuggled.encode()
    files = broker.pki.agent("expense-assistant")
    ctx = client_ssl_context(broker.pki, files.cert, files.key)
    port = broker.running.main_address[1]
    reply = await rawhttp.exchange(port, ctx, data, deadline=3)
    print("\nCASE", case, reply.statuses, reply.closed, len(upstream.received), reply.data[:300])
