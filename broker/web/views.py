"""The approvals page's HTML (CONTRACT §14), the pure part: view models built from approvals, and rendering.

Everything shown comes from an agent or a token, so everything is escaped (:func:`visible`), and characters a
reader cannot see — bidi overrides and isolates (U+202A–202E, U+2066–2069, "Trojan Source"), zero-width and
other format characters, controls, unassigned and private-use code points, the other default-ignorable code points
(variation selectors, the combining grapheme joiner), blank-looking letters (Hangul fillers, the Braille blank)
and every space but U+0020 — are shown as a marked ``U+XXXX``
instead of acting on the text around them; an approval whose arguments carry any says so above its arguments.
Arguments are shown whole (an approval's arguments are capped at 32 KiB), as JSON with their types, wrapped by
the stylesheet rather than cut: what is hidden cannot be judged. No script, no inline style: the page works
under ``default-src 'none'; style-src 'self'``.
"""

from __future__ import annotations

import html
import json
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from broker.txn.approval_rules import Approval, rfc3339

__all__ = ["ApprovalView", "render_list", "render_message", "render_result", "view_of", "visible"]

STYLESHEET_PATH: Final = "/approvals/static/style.css"
_HIDDEN_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cn", "Co", "Cs", "Zl", "Zp"})
_OBLIGATIONS: Final = {
    "manager_approval": "manager approval (one manager)",
    "dual_approval": "dual approval (two different approvers)",
    "security_review": "security review",
}


#: Default_Ignorable_Code_Point (Unicode DerivedCoreProperties.txt) outside the categories above: rendered as
#: nothing, so a reader cannot see them
_DEFAULT_IGNORABLE: Final = (
    (0x034F, 0x034F),  # combining grapheme joiner
    (0x115F, 0x1160),  # Hangul choseong / jungseong fillers
    (0x17B4, 0x17B5),  # Khmer inherent vowels
    (0x180B, 0x180F),  # Mongolian free variation selectors
    (0x3164, 0x3164),  # Hangul filler
    (0xFE00, 0xFE0F),  # variation selectors
    (0xFFA0, 0xFFA0),  # halfwidth Hangul filler
    (0xE0000, 0xE0FFF),  # tags, variation selectors supplement
)
#: letters and symbols drawn blank
_BLANK: Final = frozenset({0x2800})  # Braille pattern blank


def _hidden(char: str) -> bool:
    if char == "\n":
        return False
    category = unicodedata.category(char)
    if category in _HIDDEN_CATEGORIES or (category == "Zs" and char != " "):
        return True
    code = ord(char)
    return code in _BLANK or any(low <= code <= high for low, high in _DEFAULT_IGNORABLE)


def has_hidden(text: str) -> bool:
    return any(_hidden(c) for c in text)


def visible(text: str) -> str:
    """``text`` as HTML: escaped, invisible characters shown as a marked ``U+XXXX``."""
    out: list[str] = []
    for char in text:
        if _hidden(char):
            out.append(f'<span class="hidden-char">U+{ord(char):04X}</span>')
        else:
            out.append(html.escape(char, quote=True))
    return "".join(out)


@dataclass(frozen=True, slots=True)
class ApprovalView:
    """What an approver sees of one approval."""

    id: str
    tool: str
    arguments_json: str
    #: arguments the broker sets itself from the requester's token: (name, expression)
    injected: tuple[tuple[str, str], ...]
    subject: str
    actor: str
    required: tuple[str, ...]
    reason: str
    expires_at: str
    minutes_left: int
    votes: tuple[str, ...]
    hidden_characters: bool


def view_of(approval: Approval, *, injections: Mapping[str, str], now: float) -> ApprovalView:
    arguments_json = json.dumps(dict(approval.arguments), indent=2, ensure_ascii=False, sort_keys=True)
    texts = [arguments_json, approval.tool, approval.subject, approval.actor or "", approval.reason]
    return ApprovalView(
        id=approval.id,
        tool=approval.tool,
        arguments_json=arguments_json,
        injected=tuple(sorted(injections.items())),
        subject=approval.subject,
        actor=approval.actor or "(none: the person acted directly)",
        required=tuple(_OBLIGATIONS.get(name, name) for name in approval.required),
        reason=approval.reason or "(no reason given by the policy)",
        expires_at=rfc3339(approval.expires_at),
        minutes_left=max(0, int((approval.expires_at - now) // 60)),
        votes=tuple(f"{v.sub} ({v.decision}d)" for v in approval.approvals),
        hidden_characters=any(has_hidden(t) for t in texts),
    )


def _page(title: str, body: str, *, user: str | None = None, csrf: str | None = None) -> str:
    account = ""
    if user is not None and csrf is not None:
        account = (
            f'<form class="account" method="post" action="/approvals/logout">'
            f"<span>Signed in as <strong>{visible(user)}</strong></span>"
            f'<input type="hidden" name="csrf" value="{html.escape(csrf)}">'
            f'<button type="submit" class="secondary">Sign out</button></form>'
        )
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta name="referrer" content="no-referrer"><title>{visible(title)} · broker</title>'
        f'<link rel="stylesheet" href="{STYLESHEET_PATH}"></head>'
        f'<body><header><p class="brand"><a href="/approvals/">broker approvals</a></p>{account}</header>'
        f'<main id="main"><h1>{visible(title)}</h1>{body}</main></body></html>\n'
    )


def _card(view: ApprovalView, csrf: str) -> str:
    injected = "".join(
        f"<li><code>{visible(name)}</code> is set by the broker from the requester's token "
        f"(<code>{visible(expr)}</code>), whatever the agent sent</li>"
        for name, expr in view.injected
    )
    warning = (
        '<p class="warning" role="alert">These details contain invisible or direction-changing characters, '
        "shown as U+XXXX. Read them carefully before you decide.</p>"
        if view.hidden_characters
        else ""
    )
    votes = f"<dt>Decided so far</dt><dd>{visible(', '.join(view.votes))}</dd>" if view.votes else ""
    heading_id = f"approval-{view.id}"
    token = html.escape(csrf)
    buttons = "".join(
        f'<form method="post" action="/approvals/{view.id}">'
        f'<input type="hidden" name="csrf" value="{token}">'
        f'<input type="hidden" name="decision" value="{decision}">'
        f'<button type="submit" class="{decision}" aria-describedby="{heading_id}">{label}</button></form>'
        for decision, label in (("approve", "Approve"), ("deny", "Deny"))
    )
    return (
        f'<article class="approval" aria-labelledby="{heading_id}">'
        f'<h2 id="{heading_id}"><code>{visible(view.tool)}</code> for {visible(view.subject)}</h2>'
        f"{warning}<dl>"
        f"<dt>Requested by</dt><dd>{visible(view.subject)}</dd>"
        f"<dt>Through agent</dt><dd><code>{visible(view.actor)}</code></dd>"
        f"<dt>Needs</dt><dd>{visible(', '.join(view.required))}</dd>"
        f"<dt>Why</dt><dd>{visible(view.reason)}</dd>"
        f'<dt>Expires</dt><dd><time datetime="{view.expires_at}">{view.expires_at}</time> '
        f"(in {view.minutes_left} min)</dd>{votes}</dl>"
        f'<h3>Arguments you authorise</h3><pre class="arguments">{visible(view.arguments_json)}</pre>'
        f"{f'<ul class=injected>{injected}</ul>' if injected else ''}"
        f'<div class="decide">{buttons}</div>'
        f'<p class="permalink"><a href="/approvals/{view.id}">Link to this approval</a></p></article>'
    )


def render_list(views: Sequence[ApprovalView], *, user: str, csrf: str, total: int | None = None) -> str:
    """``total``: how many are waiting when ``views`` shows only the oldest of them."""
    waiting = max(total or 0, len(views))
    if views:
        body = "".join(_card(view, csrf) for view in views)
        intro = f"<p>{waiting} request{'s' if waiting != 1 else ''} waiting for your decision"
        intro += f"; the oldest {len(views)} are shown.</p>" if waiting > len(views) else ".</p>"
    else:
        body, intro = "", '<p class="empty">Nothing is waiting for your decision.</p>'
    return _page("Approvals waiting for you", intro + body, user=user, csrf=csrf)


def render_detail(view: ApprovalView, *, user: str, csrf: str) -> str:
    return _page("Approval request", _card(view, csrf), user=user, csrf=csrf)


def render_result(decision: str, state: str, *, user: str, csrf: str) -> str:
    outcome = {
        "approved": "The request is approved; the agent can now repeat its call.",
        "denied": "The request is denied.",
        "pending": "Your approval is recorded; the request still needs another approver.",
    }.get(state, f"The request is now {state}.")
    verb = "approved" if decision == "approve" else "denied"
    body = f'<p role="status">You {verb} it. {visible(outcome)}</p><p><a href="/approvals/">Back to approvals</a></p>'
    return _page("Decision recorded", body, user=user, csrf=csrf)


def render_message(
    title: str,
    paragraphs: Iterable[str],
    *,
    link: tuple[str, str] | None = None,
    user: str | None = None,
    csrf: str | None = None,
) -> str:
    """A page of plain text paragraphs (escaped) and an optional (href, label) link of ours."""
    body = "".join(f"<p>{visible(p)}</p>" for p in paragraphs)
    if link is not None:
        body += f'<p><a href="{html.escape(link[0])}">{visible(link[1])}</a></p>'
    return _page(title, body, user=user, csrf=csrf)


def render_continue(target: str) -> str:
    """After login: a same-site page that moves on to ``target`` (a path of ours). A redirect would not do:
    the browser treats a redirect chain that started at the issuer as cross-site and withholds the new
    ``SameSite=Strict`` session cookie on it."""
    href = html.escape(target)
    return (
        "<!doctype html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="0;url={href}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>Signed in · broker</title><link rel="stylesheet" href="{STYLESHEET_PATH}"></head>'
        f'<body><main id="main"><h1>Signed in</h1><p><a href="{href}">Continue to your approvals</a></p>'
        "</main></body></html>\n"
    )


STYLESHEET: Final = """\
:root { color-scheme: light dark; --fg: #1b1f24; --bg: #fff; --muted: #57606a; --line: #d0d7de;
  --ok: #1a7f37; --no: #cf222e; --warn-bg: #fff8c5; --card: #f6f8fa; }
@media (prefers-color-scheme: dark) {
  :root { --fg: #e6edf3; --bg: #0d1117; --muted: #9da7b3; --line: #30363d; --ok: #3fb950; --no: #f85149;
    --warn-bg: #3b2e00; --card: #161b22; } }
* { box-sizing: border-box; }
body { margin: 0; font: 16px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg);
  background: var(--bg); }
header { display: flex; flex-wrap: wrap; gap: .5rem 1rem; align-items: center; justify-content: space-between;
  padding: .75rem 1rem; border-bottom: 1px solid var(--line); }
header .brand { margin: 0; font-weight: 600; }
header a { color: inherit; text-decoration: none; }
.account { display: flex; gap: .75rem; align-items: center; flex-wrap: wrap; margin: 0; }
main { max-width: 52rem; margin: 0 auto; padding: 1rem; }
h1 { font-size: 1.5rem; margin: .5rem 0 1rem; }
h2 { font-size: 1.15rem; margin: 0 0 .5rem; overflow-wrap: anywhere; }
h3 { font-size: 1rem; margin: 1rem 0 .25rem; }
.approval { border: 1px solid var(--line); border-radius: 8px; background: var(--card); padding: 1rem;
  margin: 0 0 1rem; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .25rem 1rem; margin: 0; }
dt { color: var(--muted); }
dd { margin: 0; overflow-wrap: anywhere; min-width: 0; }
@media (max-width: 30rem) { dl { grid-template-columns: 1fr; } dd { margin-bottom: .5rem; } }
pre.arguments { margin: 0; padding: .75rem; background: var(--bg); border: 1px solid var(--line);
  border-radius: 6px; white-space: pre-wrap; overflow-wrap: anywhere; max-height: 24rem; overflow-y: auto;
  font-size: .9rem; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; overflow-wrap: anywhere; }
.hidden-char { border: 1px solid var(--no); color: var(--no); border-radius: 3px; padding: 0 2px;
  font-size: .8em; }
.warning { background: var(--warn-bg); border-left: 4px solid var(--no); padding: .5rem .75rem; }
.injected { color: var(--muted); font-size: .9rem; }
.decide { display: flex; gap: .75rem; flex-wrap: wrap; margin-top: 1rem; }
.decide form { margin: 0; }
button { font: inherit; min-height: 44px; min-width: 7rem; padding: .5rem 1rem; border-radius: 6px;
  border: 1px solid var(--line); background: var(--bg); color: var(--fg); cursor: pointer; }
button.approve { background: var(--ok); border-color: var(--ok); color: #fff; }
button.deny { background: var(--no); border-color: var(--no); color: #fff; }
button.secondary { min-width: 0; min-height: 36px; }
button:focus-visible, a:focus-visible { outline: 3px solid #0969da; outline-offset: 2px; }
.permalink { margin: .75rem 0 0; font-size: .9rem; }
a { color: #0969da; }
@media (prefers-color-scheme: dark) { a { color: #58a6ff; } }
"""
