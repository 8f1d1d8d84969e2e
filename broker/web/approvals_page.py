"""The approvals page (CONTRACT §14): ``/approvals/`` on the main listener, no client certificate needed.

    GET  /approvals/                    the pending approvals this person may decide (same rules as §6), the
                                        oldest :data:`MAX_LISTED` of them
    GET  /approvals/{id}                one of them (read by id, judged by the same rules); any other id
                                        (missing, someone else's, the person's own) is the same "nothing here
                                        for you" page
    POST /approvals/{id}                approve / deny: session, then CSRF (:func:`broker.web.session.post_refusal`),
                                        then exactly the decision of ``POST /v1/approvals/{id}``
                                        (:func:`broker.gateway.approvals.decide_as`: rules, MFA, vote) and its audit
                                        record, with ``channel: "web"``
    GET  /approvals/static/style.css    the stylesheet (the only subresource)

Who may see and decide is never computed here: the list is :func:`broker.gateway.approvals.decidable`, one
approval :func:`broker.txn.approval_rules.refusal`, the decision :func:`~broker.gateway.approvals.decide_as`. A
person is (issuer, subject) throughout. A POST without a session is counted as anonymous noise (CONTRACT §15); a
session whose subject an operator revoked ends at its next request (:class:`~broker.web.session.SessionRevoked`).
"""

from __future__ import annotations

import time
from typing import Final

from aiohttp import web

from broker.context import CTX
from broker.errors import AccessDenied, BrokerError, InvalidRequest, NotFound
from broker.gateway.approvals import decidable, decide_as, decision_reason, verdict
from broker.gateway.middleware import audit_decision
from broker.resources import APPROVALS, RUNTIME
from broker.txn.approval_rules import Approval, refusal
from broker.web.http import SECURITY_HEADERS, html_response, refuse
from broker.web.oidc_login import current_session, public_origin, ui_config
from broker.web.session import SESSION_COOKIE, SessionRevoked, WebSession, expired_cookie_header, post_refusal
from broker.web.views import STYLESHEET, ApprovalView, render_detail, render_list, render_result, view_of

__all__ = ["add_routes", "approval_page", "decide", "list_page", "stylesheet"]

ID_PATTERN: Final = "{id:[A-Za-z0-9_-]{22}}"
_MAX_FORM_BYTES: Final = 4096
#: approvals shown on the list page (oldest first); the rest are reached by their link, or once these are decided
MAX_LISTED: Final = 50


def add_routes(app: web.Application) -> None:
    """The page's routes (fixed paths first: an id never collides with them, its pattern is 22 characters)."""
    from broker.web import oidc_login

    app.router.add_get("/approvals/static/style.css", stylesheet)
    app.router.add_get("/approvals/login", oidc_login.login)
    app.router.add_get("/approvals/callback", oidc_login.callback)
    app.router.add_post("/approvals/logout", oidc_login.logout)
    app.router.add_get("/approvals/", list_page)
    app.router.add_get("/approvals", _to_list)
    app.router.add_get(f"/approvals/{ID_PATTERN}", approval_page)
    app.router.add_post(f"/approvals/{ID_PATTERN}", decide)


async def _to_list(request: web.Request) -> web.StreamResponse:
    return await _redirect("/approvals/")


async def _redirect(location: str) -> web.StreamResponse:
    return html_response("", status=303, headers={"Location": location})


async def stylesheet(request: web.Request) -> web.StreamResponse:
    request[CTX].route = "metadata"
    response = web.Response(text=STYLESHEET, content_type="text/css", charset="utf-8")
    response.headers.update(SECURITY_HEADERS)
    response.headers["Cache-Control"] = "public, max-age=300"
    return response


def _injections(request: web.Request, approval: Approval) -> dict[str, str]:
    tool = request.app[RUNTIME].current.config.tool(approval.tool)
    return dict(tool.inject) if tool is not None else {}


async def _views(
    request: web.Request, session: WebSession, now: float
) -> tuple[list[tuple[Approval, ApprovalView]], int]:
    """The oldest :data:`MAX_LISTED` approvals this person may decide, as views, and how many there are."""
    service = request.app[APPROVALS]
    approvals = await decidable(service, session.iss, session.sub, session.claims, now)
    views = [
        (approval, view_of(approval, injections=_injections(request, approval), now=now))
        for approval in approvals[:MAX_LISTED]
    ]
    return views, len(approvals)


async def _revoked(request: web.Request, error: SessionRevoked) -> web.Response:
    request[CTX].subject = error.session.sub
    return await refuse(
        request,
        AccessDenied("this person's access has been revoked", reason="revoked_sub"),
        title="Access revoked",
        text="Your access to the approvals page has been revoked. Nothing was recorded.",
        link=None,
        headers={"Set-Cookie": expired_cookie_header(SESSION_COOKIE)},
    )


async def _signed_in(request: web.Request) -> WebSession | web.StreamResponse:
    ui_config(request)  # 404 when the page is not configured
    try:
        session = await current_session(request)
    except SessionRevoked as revoked:
        return await _revoked(request, revoked)
    if session is None:
        return await _redirect(f"/approvals/login?return_to={request.path}")
    request[CTX].subject = session.sub
    return session


async def list_page(request: web.Request) -> web.StreamResponse:
    session = await _signed_in(request)
    if not isinstance(session, WebSession):
        return session
    pairs, total = await _views(request, session, time.time())
    views = [view for _, view in pairs]
    return html_response(render_list(views, user=session.sub, csrf=session.csrf, total=total))


async def approval_page(request: web.Request) -> web.StreamResponse:
    session = await _signed_in(request)
    if not isinstance(session, WebSession):
        return session
    now = time.time()
    service = request.app[APPROVALS]
    approval = await service.book.get(request.match_info["id"], now)
    if approval is not None and (
        refusal(
            approval,
            approver_iss=session.iss,
            approver_sub=session.sub,
            approver_claims=session.claims,
            eligible=service.eligibility.for_approval(approval),
            now=now,
        )
        is None
    ):
        view = view_of(approval, injections=_injections(request, approval), now=now)
        return html_response(render_detail(view, user=session.sub, csrf=session.csrf))
    return await refuse(
        request,
        NotFound("no such approval", reason="approval_not_visible"),
        title="Nothing to decide here",
        text="There is no request at this address that you can decide: it was decided, expired, is your own, "
        "or is not for you.",
    )


async def decide(request: web.Request) -> web.StreamResponse:
    """``POST /approvals/{id}`` (form: ``csrf``, ``decision``): the decision of ``POST /v1/approvals/{id}``."""
    ctx = request[CTX]
    ctx.route, ctx.channel = "approval", "web"  # first: every refusal below is audited as an approval event
    ui_config(request)
    try:
        session = await current_session(request)
    except SessionRevoked as revoked:
        return await _revoked(request, revoked)
    if session is None:  # nobody to name: counted as noise, not one audit record per POST
        return await refuse(
            request,
            _SessionEnded("sign in to decide", reason="web_session_missing"),
            title="Your session has ended",
            text="Sign in again to decide this request. Nothing was recorded.",
            link=(f"/approvals/login?return_to=/approvals/{request.match_info['id']}", "Sign in"),
            anonymous=True,
        )
    ctx.subject = session.sub
    try:
        form = await _form(request)
        reason = post_refusal(
            request.headers,
            origin=public_origin(request),
            form_token=form.get("csrf"),
            session_token=session.csrf,
        )
        if reason is not None:
            raise _CrossSite("cross-site request refused", reason=reason)
        decision = verdict(form.get("decision"))
        now = time.time()
        service = request.app[APPROVALS]
        approval = await service.book.get(request.match_info["id"], now)
        if approval is None:
            raise NotFound("no such approval", reason="approval_unknown")
        ctx.tool, ctx.args_digest = approval.tool, approval.args_digest
        updated = await decide_as(
            service,
            approval,
            approver_iss=session.iss,
            approver_sub=session.sub,
            approver_claims=session.claims,
            decision=decision,
            now=now,
        )
    except BrokerError as error:
        return await refuse(
            request, error, title=_TITLES.get(error.status, "Not possible"), text=_text(error)
        )
    ctx.decision, ctx.reason, ctx.status = "allow", decision_reason(decision, updated, now), 200
    await audit_decision(request.app, ctx)  # CONTRACT §9: written before the answer leaves
    return html_response(render_result(decision, updated.state_at(now), user=session.sub, csrf=session.csrf))


class _SessionEnded(BrokerError):
    status = 401
    code = "login_required"


class _CrossSite(BrokerError):
    status = 403
    code = "access_denied"


_TITLES: Final = {
    400: "Request not understood",
    401: "Sign in again",
    403: "Not possible",
    404: "Nothing to decide here",
}


def _text(error: BrokerError) -> str:
    if isinstance(error, _CrossSite):
        return "This request did not come from the approvals page. Nothing was recorded."
    if error.status == 401:  # MFA: the session always has it, unless the issuer's claims changed meaning
        return "Deciding needs multi-factor authentication. Sign in again with your second factor."
    if error.status in (403, 404):
        return "You cannot decide this request: it was decided, expired, is your own, or is not for you."
    return f"{error.description}. Nothing was recorded."


async def _form(request: web.Request) -> dict[str, str]:
    """The urlencoded form, each field at most once; anything else is a 400 before any decision."""
    if request.content_type != "application/x-www-form-urlencoded":
        raise InvalidRequest("send the page's form", reason="web_form_type")
    if request.content_length is None or request.content_length > _MAX_FORM_BYTES:
        raise InvalidRequest("the form is too large", reason="web_form_size")
    posted = await request.post()
    fields: dict[str, str] = {}
    for name in set(posted.keys()):
        values = posted.getall(name)
        if len(values) != 1 or not isinstance(values[0], str):
            raise InvalidRequest("each field once", reason="web_form_field")
        fields[name] = values[0]
    return fields
