"""Reads the status page back (the server's HTML, or the DOM a browser built from it) into
plain values: its tables by their data-* attributes, the figures of its cards, and every
element and reference it holds."""

import collections
import html.parser


class Page:
    """streams: {(pod, model, dp rank): {column key: text}}; namespaces: {name: {key: text}};
    figures: {key: text} of the cards' rows; diagnoses: the texts of the streams' diagnosis
    rows; tags: Counter of element names; references: every src/href/action value;
    refresh: the meta refresh's content or None; text: all text, whitespace collapsed."""

    def __init__(self, markup):
        reader = _Reader()
        reader.feed(markup)
        reader.close()
        self.streams = reader.streams
        self.namespaces = reader.namespaces
        self.figures = reader.figures
        self.diagnoses = reader.diagnoses
        self.tags = reader.tags
        self.references = reader.references
        self.refresh = reader.refresh
        self.text = " ".join(" ".join(reader.texts).split())


class _Reader(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.streams, self.namespaces, self.figures = {}, {}, {}
        self.diagnoses = []
        self.tags = collections.Counter()
        self.references = []
        self.refresh = None
        self.texts = []
        self._row = None          # (table of the row, its key, {cell key: text})
        self._cell = None         # (cell key, [text])
        self._diagnosis = None
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags[tag] += 1
        self._in_style = tag == "style"
        self.references += [attrs[name] for name in ("src", "href", "action", "srcset", "data") if name in attrs]
        if tag == "meta" and (attrs.get("http-equiv") or "").lower() == "refresh":
            self.refresh = attrs.get("content")
        if tag == "tr":
            if "data-pod" in attrs and "data-model" in attrs:
                self._row = ("streams", (attrs["data-pod"], attrs["data-model"], int(attrs["data-rank"])), {})
            elif "data-namespace" in attrs:
                self._row = ("namespaces", attrs["data-namespace"], {})
            elif attrs.get("class") == "diagnosis":
                self._diagnosis = []
        elif tag == "td" and "data-key" in attrs:
            self._cell = (attrs["data-key"], [])

    def handle_endtag(self, tag):
        self._in_style = False
        if tag == "td" and self._cell is not None:
            key, parts = self._cell
            text = " ".join("".join(parts).split())
            if self._row is not None:
                self._row[2][key] = text
            else:
                self.figures[key] = text
            self._cell = None
        elif tag == "tr":
            if self._row is not None:
                table, key, cells = self._row
                getattr(self, table)[key] = cells
                self._row = None
            if self._diagnosis is not None:
                self.diagnoses.append(" ".join("".join(self._diagnosis).split()))
                self._diagnosis = None

    def handle_data(self, data):
        if self._in_style:
            return
        self.texts.append(data)
        if self._cell is not None:
            self._cell[1].append(data)
        if self._diagnosis is not None:
            self._diagnosis.append(data)
