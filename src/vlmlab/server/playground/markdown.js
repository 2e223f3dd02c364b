// A small Markdown renderer for model answers that cannot run anything: it builds DOM nodes with
// createElement and textContent, never innerHTML; links keep only http(s) targets and open with
// rel="noopener noreferrer". Covers fenced code, headings, lists, tables, quotes, paragraphs,
// code spans, bold and emphasis; anything else stays text.

/** An element with an optional class and text (set as textContent, never parsed). */
export function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

const SAFE_LINK = /^https?:\/\//i;

function renderInline(text, parent) {
  // Code spans, links, bold, emphasis; everything else is text.
  const pattern = /(`+)([\s\S]*?[^`])\1(?!`)|\[([^\]\n]+)\]\(([^)\s]+)\)|\*\*([^*\n]+)\*\*|__([^_\n]+)__|\*([^*\n]+)\*|\b_([^_\n]+)_\b/g;
  let last = 0;
  for (const m of text.matchAll(pattern)) {
    if (m.index > last) parent.append(document.createTextNode(text.slice(last, m.index)));
    if (m[1]) parent.append(el("code", null, m[2]));
    else if (m[3] !== undefined) {
      if (SAFE_LINK.test(m[4])) {
        const a = el("a", null, m[3]);
        a.href = m[4];
        a.rel = "noopener noreferrer";
        a.target = "_blank";
        parent.append(a);
      } else {
        parent.append(document.createTextNode(m[0]));  // not a web link: shown as typed
      }
    } else if (m[5] || m[6]) renderInline(m[5] || m[6], parent.appendChild(el("strong")));
    else renderInline(m[7] || m[8], parent.appendChild(el("em")));
    last = m.index + m[0].length;
  }
  if (last < text.length) parent.append(document.createTextNode(text.slice(last)));
}

function tableCells(line) {
  let row = line.trim();
  if (row.startsWith("|")) row = row.slice(1);
  if (row.endsWith("|")) row = row.slice(0, -1);
  return row.split("|").map((c) => c.trim());
}

const TABLE_RULE = /^\s*\|?\s*:?-{2,}:?\s*(\|\s*:?-{2,}:?\s*)*\|?\s*$/;
const LIST_ITEM = /^\s*([-*+]|\d+[.)])\s+(.*)$/;

/** Markdown text -> a DocumentFragment (code blocks, headings, lists, tables, quotes, paragraphs). */
export function renderMarkdown(text) {
  const out = document.createDocumentFragment();
  const lines = text.replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(/^\s*(```|~~~)\s*([\w+-]*)/);
    if (fence) {
      const body = [];
      i += 1;
      while (i < lines.length && !lines[i].trim().startsWith(fence[1])) body.push(lines[i++]);
      i += 1;
      const pre = el("pre");
      const code = el("code", null, body.join("\n"));
      if (fence[2]) code.dataset.lang = fence[2];
      pre.append(code);
      out.append(pre);
      continue;
    }
    if (!line.trim()) { i += 1; continue; }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    if (heading) {
      const h = el(`h${Math.min(6, heading[1].length + 2)}`);
      renderInline(heading[2], h);
      out.append(h);
      i += 1;
      continue;
    }
    if (line.includes("|") && i + 1 < lines.length && TABLE_RULE.test(lines[i + 1])) {
      const table = el("table");
      const head = table.appendChild(el("thead")).appendChild(el("tr"));
      for (const cell of tableCells(line)) renderInline(cell, head.appendChild(el("th")));
      const tbody = table.appendChild(el("tbody"));
      i += 2;
      while (i < lines.length && lines[i].includes("|") && lines[i].trim()) {
        const tr = tbody.appendChild(el("tr"));
        for (const cell of tableCells(lines[i++])) renderInline(cell, tr.appendChild(el("td")));
      }
      out.append(table);
      continue;
    }
    if (/^\s*>/.test(line)) {
      const body = [];
      while (i < lines.length && /^\s*>/.test(lines[i])) body.push(lines[i++].replace(/^\s*>\s?/, ""));
      const quote = el("blockquote");
      quote.append(renderMarkdown(body.join("\n")));
      out.append(quote);
      continue;
    }
    const item = line.match(LIST_ITEM);
    if (item) {
      const ordered = /\d/.test(item[1]);
      const list = el(ordered ? "ol" : "ul");
      while (i < lines.length) {
        const m = lines[i].match(LIST_ITEM);
        if (m) { renderInline(m[2], list.appendChild(el("li"))); i += 1; }
        else if (lines[i].trim() && /^\s{2,}/.test(lines[i]) && list.lastChild) {
          list.lastChild.append(document.createTextNode(" "));
          renderInline(lines[i++].trim(), list.lastChild);
        } else break;
      }
      out.append(list);
      continue;
    }
    const para = [];
    while (i < lines.length && lines[i].trim() && !/^\s*(```|~~~|#{1,6}\s|>)/.test(lines[i]) && !LIST_ITEM.test(lines[i])) {
      para.push(lines[i++]);
    }
    if (!para.length) para.push(lines[i++]);
    const p = el("p");
    para.forEach((part, n) => {
      if (n) p.append(el("br"));
      renderInline(part, p);
    });
    out.append(p);
  }
  return out;
}
