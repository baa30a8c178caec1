// The results: a big viewer, thumbnails of every image of the session (newest first), and for the one
// shown its infotext, its seed and a download link. Each PNG is the server's own bytes, so a downloaded
// file carries its parameters (the `parameters` text chunk, as A1111 writes it).

const $ = (id) => document.getElementById(id);

export class Gallery {
  constructor() {
    this.items = []; // {url, infotext, seed, name}
    this.shown = null;
    this.counter = 0;
    this.onchange = () => {};
  }

  // One generation's answer: base64 PNGs and A1111's info JSON (infotexts and seeds, one per image).
  add(answer) {
    let info = {};
    try {
      info = JSON.parse(answer.info || "{}");
    } catch {
      info = {};
    }
    const added = (answer.images || []).map((data, index) => {
      const seed = info.all_seeds?.[index] ?? info.seed ?? null;
      this.counter += 1;
      return {
        url: data.startsWith("data:") ? data : `data:image/png;base64,${data}`,
        infotext: info.infotexts?.[index] ?? "",
        seed,
        name: `${String(this.counter).padStart(5, "0")}-${seed ?? "image"}.png`,
      };
    });
    this.items.unshift(...added);
    this.render();
    if (added.length) this.show(added[0]);
    return added;
  }

  show(item) {
    this.shown = item;
    const viewer = $("viewer");
    viewer.src = item.url;
    viewer.classList.remove("preview");
    $("viewer_hint").hidden = true;
    $("infotext").textContent = item.infotext;
    const download = $("download");
    download.href = item.url;
    download.download = item.name;
    for (const id of ["download", "to_img2img", "restore_shown"]) $(id).hidden = false;
    for (const thumb of $("gallery").children) thumb.classList.toggle("selected", thumb.item === item);
    this.onchange(item);
  }

  // A live preview of the running job, in the viewer until its images arrive.
  preview(url) {
    const viewer = $("viewer");
    viewer.src = url;
    viewer.classList.add("preview");
    $("viewer_hint").hidden = true;
  }

  render() {
    const gallery = $("gallery");
    gallery.replaceChildren(
      ...this.items.map((item) => {
        const thumb = document.createElement("img");
        thumb.src = item.url;
        thumb.alt = `seed ${item.seed}`;
        thumb.title = item.name;
        thumb.item = item;
        thumb.addEventListener("click", () => this.show(item));
        return thumb;
      }),
    );
  }
}
