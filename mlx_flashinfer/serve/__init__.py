"""The OpenAI-compatible HTTP server: requests checked and shaped (`openai_api.py`),
served one at a time by a generation thread over the API's `stream_generate`
(`server.py`)."""
