"""``python -m broker.dev.bench.micro``: what each per-call stage costs, in µs (medians), on this machine.

Run by ``make bench`` after the whole-path set-ups; the figures are merged into ``var/bench.json`` under
``micro``. Every case runs the real code on realistic inputs (the expense scenario's config, alice's claims, an
ES256 proof and token); nothing is mocked. Medians of several repeats, because the machines are shared.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker.audit.sink import AuditLog
from broker.canonical import args_digest, canonicalize, strict_loads
from broker.config.loader import load_config
from broker.dev.pki import generate
from broker.identity.dpop import DpopPolicy, verify_proof
from broker.jose import Signer, generate_ec_jwk
from broker.policy.engine import PolicySet
from broker.sdk.agent import DpopSigner
from broker.txn.minted import MintedHere
from broker.txn.tokens import mint_txn_token, verification_keys, verify_txn_token

ROOT = Path(__file__).resolve().parents[3]
ALICE = {
    "iss": "https://idp.example.org",
    "sub": "alice",
    "aud": "https://broker.example.org",
    "iat": 1,
    "exp": 2,
    "groups": ["finance-managers"],
    "department": "42",
    "approval_limit": 20000,
    "acr": "mfa",
    "amr": ["pwd", "otp"],
    "name": "Alice Example",
    "email": "alice@example.org",
    "jti": "x" * 22,
}
AGENT = "spiffe://example.org/agents/expense-assistant"
ARGS = {"invoice_id": "INV-8831", "amount": 4800, "department": "42"}


def median_us(fn: Callable[[], Any], *, number: int, repeat: int = 5) -> float:
    return statistics.median(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def cases(work: Path) -> dict[str, Callable[[], Any]]:
    generate(work / "certs")
    loaded = load_config(ROOT / "config/examples/expense.yaml", environ={"BROKER_CERTS": str(work / "certs")})
    config = loaded.config
    policies = PolicySet.compile(
        config.policies, tools=[t.name for t in config.tools], counters=[c.name for c in config.counters]
    )
    counters = {"approvals_10m": {"count": 2, "sum": 9600.0}}

    def decide() -> Any:
        env = policies.build_env(
            subject=ALICE,
            actor_id=AGENT,
            tool="approveExpense",
            args=None,
            counters=counters,
            now=int(time.time()),
        )
        policies.visible("approveExpense", env)
        env.bind_args(ARGS)
        return policies.decide("approveExpense", env)

    signer = Signer.from_jwk(generate_ec_jwk())
    audit = AuditLog(work / "audit.jsonl", signer=signer, checkpoint_every=100)
    audit.open()
    record = {
        "event": "invocation",
        "decision": "allow",
        "reason": "",
        "request_id": "r" * 24,
        "subject": "alice",
        "actor": AGENT,
        "tool": "approveExpense",
        "args_digest": args_digest(ARGS),
        "txn": "t" * 22,
        "policy_version": loaded.policy_version,
        "status": None,
    }
    dpop = DpopSigner(generate_ec_jwk())
    url = "https://localhost:8443/v1/tools/approveExpense"
    proofs = iter([dpop.proof("POST", url, access_token="tok") for _ in range(30_000)])
    policy = DpopPolicy()
    body = json.dumps(ARGS).encode()
    mint = functools.partial(
        mint_txn_token,
        signer,
        issuer="https://localhost:8443",
        audience="example.org",
        subject="alice",
        scope="tool:approveExpense",
        actor_id=AGENT,
        tool="approveExpense",
        arguments=ARGS,
        policy_version="v",
        cnf_jkt=dpop.jkt,
        req_ip="127.0.0.1",
        authn="dpop",
        injected={"department": "42"},
    )
    minted = mint(now=time.time())
    keys = verification_keys(signer.public_jwk())
    here = MintedHere()
    here.remember(minted.token, keys[signer.kid])

    return {
        "policy: build env + visibility + decide (expense rules)": decide,
        "strict JSON parse of the arguments": lambda: strict_loads(body),
        "RFC 8785 args_digest": lambda: args_digest(ARGS),
        "canonical body bytes": lambda: canonicalize(ARGS),
        "DPoP proof verification (ES256)": lambda: verify_proof(
            next(proofs), policy=policy, method="POST", htu=url, access_token="tok", now=time.time()
        ),
        "txn token mint (ES256)": lambda: mint(now=time.time()),
        "txn token verification (ES256)": lambda: verify_txn_token(
            minted.token, keys=keys, issuer="https://localhost:8443", audience="example.org", now=time.time()
        ),
        "txn token verification, signed by this process (its invocation after an exchange)": lambda: (
            verify_txn_token(
                minted.token,
                keys=keys,
                issuer="https://localhost:8443",
                audience="example.org",
                now=time.time(),
                signed_here=here.vouches,
            )
        ),
        "audit record (hash chain, write)": lambda: audit.append(record),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m broker.dev.bench.micro",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("var/bench.json"), help="merged under 'micro'")
    parser.add_argument("--number", type=int, default=2000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: round(median_us(fn, number=args.number), 1) for name, fn in cases(Path(tmp)).items()}
    width = max(map(len, results))
    print(f"{'stage':<{width}}  µs (median)")
    for name, value in results.items():
        print(f"{name:<{width}}  {value:8.1f}")
    document: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    document["micro"] = {"us_median": results, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
