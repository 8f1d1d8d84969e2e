"""Who may approve: the compiled approver rules (``approvals.<obligation>.when``, CONTRACT §6).

Pure: CEL compiled at load (located errors), evaluated per approver; only an exact ``true`` makes someone
eligible (an error, a non-bool, an unknown obligation: not eligible — fail closed, HOSTILE Y01).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cel
import structlog

from broker.config.models import Approvals
from broker.policy.engine import PolicyCompileError
from broker.txn.approval_rules import APPROVERS_NEEDED

if TYPE_CHECKING:
    from broker.txn.approval_rules import Approval, EligibleFn

log = structlog.get_logger("broker.approvals")

#: the obligations an approval satisfies (mfa is the requester's own token)
APPROVAL_OBLIGATIONS = tuple(APPROVERS_NEEDED)

_VARIABLES = frozenset({"approver", "request"})
# names bound by comprehension macros (``approver.groups.exists(g, g == "x")``) are not top-level references
_MACRO_BINDING = re.compile(
    r"\.\s*(?:all|exists|exists_one|existsOne|map|filter)\s*\(\s*([A-Za-z_][A-Za-z0-9_]*)\s*,"
)


class EligibilityCompileError(PolicyCompileError):
    """An ``approvals.<name>.when`` does not compile; ``problems`` = ``(("approvals", name, "when"), msg)``."""


@dataclass(frozen=True)
class Eligibility:
    """The compiled approver rules (``approvals.<obligation>.when``). Variables: ``approver`` = the approving
    human's token claims; ``request`` = ``{"tool", "subject", "actor", "args", "required"}`` of the approval
    (e.g. ``"managers" in approver.groups && request.args.amount <= approver.approval_limit``)."""

    programs: Mapping[str, cel.Program]

    @classmethod
    def compile(cls, config: Approvals) -> Eligibility:
        """Compile every rule; raise :class:`EligibilityCompileError` listing every problem."""
        programs: dict[str, cel.Program] = {}
        problems: list[tuple[tuple[str | int, ...], str]] = []
        for name in APPROVAL_OBLIGATIONS:
            source: str = getattr(config, name).when
            location: tuple[str | int, ...] = ("approvals", name, "when")
            try:
                program = cel.compile(source)
            except ValueError as exc:
                problems.append((location, f"invalid CEL: {exc}"))
                continue
            bound = set(_MACRO_BINDING.findall(source))
            undeclared = sorted(set(program.variables()) - _VARIABLES - bound)
            problems.extend((location, f"undeclared reference {ref!r}") for ref in undeclared)
            programs[name] = program
        if problems:
            raise EligibilityCompileError(problems)
        return cls(programs)

    def eligible(
        self, obligation: str, approver_claims: Mapping[str, Any], request: Mapping[str, Any] | None = None
    ) -> bool:
        """True only if the rule evaluates to exactly ``true``; an error, a non-bool or ``mfa`` is False.

        Deny on error (HOSTILE Y01); note that CEL ``||`` absorbs an error on one side (HOSTILE §0.4).
        """
        program = self.programs.get(obligation)
        if program is None:
            return False
        try:
            context = cel.Context({"approver": dict(approver_claims), "request": dict(request or {})})
            result = program.execute(context)
        # The evaluator reports missing keys, no-overload and conversion failures through several exception
        # classes; each is a failed evaluation, which means "not eligible" (fail closed). Nothing is swallowed.
        except Exception as exc:
            log.debug("approver rule failed", obligation=obligation, error=type(exc).__name__)
            return False
        return result is True

    def for_approval(self, approval: Approval) -> EligibleFn:
        """The ``eligible`` callback of the rules above, with ``request`` bound to this approval."""
        view = approval.request_view()
        return lambda obligation, claims: self.eligible(obligation, claims, view)


def has_mfa(claims: Any) -> bool:
    """RFC 9470: the token shows MFA by ``acr`` = "mfa" or "mfa" among its ``amr`` values."""
    amr = claims.get("amr")
    return claims.get("acr") == "mfa" or (isinstance(amr, list) and "mfa" in amr)
