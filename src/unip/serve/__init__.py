"""``unip serve``: a local web page over the served models — predictions of dropped frames and videos (masks, class
areas, temperatures per class), the backbone's attention profile and maps, two models side by side — and the HTTP
API the page uses (docs/serve.md).

Modules: :mod:`~unip.serve.server` (options, the socket, uvicorn, a clean stop), :mod:`~unip.serve.app` (routes),
:mod:`~unip.serve.uploads` (the private folder, size-limited multipart reading, kinds by content),
:mod:`~unip.serve.jobs` (the bounded queue and its one worker), :mod:`~unip.serve.models` (checkpoints loaded once),
:mod:`~unip.serve.predicting` (``unip predict``'s code on one upload), :mod:`~unip.serve.attention` (``unip
analyze``'s code on uploaded frames), :mod:`~unip.serve.views` (temperatures as a picture with a °C scale). The page
itself is ``static/`` (HTML, one script, one style sheet: nothing is loaded from another site).

Needs the ``serve`` extra (``pip install 'unip[serve]'``: Starlette, uvicorn, python-multipart); importing this
package does not import them.
"""
