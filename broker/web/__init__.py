"""The approvals page (CONTRACT §14): humans decide approvals in a browser.

Pure parts: :mod:`.oidc` (login messages), :mod:`.session` (cookies, CSRF, session records), :mod:`.views`
(view models and HTML). aiohttp handlers: :mod:`.oidc_login` (sign in, sign out) and :mod:`.approvals_page`
(the list, one approval, decisions); :mod:`.http` the headers every page carries.
"""
