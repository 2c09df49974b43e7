"""A folder of real photos to try transfer on, offline: Debian's `tuxpaint-stamps-default` package.

Tux Paint's stamps include a few hundred real photographs of objects cut out from their background
(GPL-2, Debian's copyright file says so; they are not shipped with this project). This writes the
photographic ones of seven categories as JPEG files on a white background, at their own (mixed) sizes,
one sub-folder per class, which is what `--dataset=folder:PATH` reads:

    sudo apt-get install tuxpaint-stamps-default
    python -m data.photos runs/photos_data
    python launch.py --flagfile=configs/photos.flags --dataset=folder:runs/photos_data

Cartoon drawings (the stamps' `cartoon` folders) are left out, and so are images under MIN_SIDE pixels.
"""

import os
import sys

STAMPS = "/usr/share/tuxpaint/stamps"
CLASSES = {  # class -> the stamp folder whose photographs (and its sub-folders') it takes
    "bird": "animals/birds",
    "flower": "plants/flowers",
    "fruit": "food/fruit",
    "household": "household",
    "mammal": "animals/mammals",
    "vegetable": "food/vegetables",
    "vehicle": "vehicles",
}
MIN_SIDE = 32


def photos(stamps=STAMPS):
    """{class: sorted stamp paths} of the photographs (PNG outside any `cartoon` folder)."""
    found = {}
    for name, folder in CLASSES.items():
        paths = []
        for directory, folders, files in os.walk(os.path.join(stamps, folder)):
            folders[:] = sorted(entry for entry in folders if entry != "cartoon")
            paths += [os.path.join(directory, file) for file in files if file.endswith(".png")]
        found[name] = sorted(paths)
    return found


def write(destination, stamps=STAMPS):
    """Writes destination/<class>/<stamp>.jpg; returns {class: images written}."""
    from PIL import Image

    written = {}
    for name, paths in photos(stamps).items():
        os.makedirs(os.path.join(destination, name), exist_ok=True)
        written[name] = 0
        for path in paths:
            with Image.open(path) as image:
                image = image.convert("RGBA")
            if min(image.size) < MIN_SIDE:
                continue
            photo = Image.new("RGB", image.size, "white")
            photo.paste(image, mask=image.getchannel("A"))
            relative = os.path.relpath(path, os.path.join(stamps, CLASSES[name]))
            photo.save(os.path.join(destination, name, relative.replace(os.sep, "_")[:-4] + ".jpg"), quality=90)
            written[name] += 1
    return written


def main(argv):
    if len(argv) != 2:
        sys.exit(f"usage: python -m data.photos DESTINATION (reads {STAMPS})")
    if not os.path.isdir(STAMPS):
        sys.exit(f"error: {STAMPS} not found: install Debian's tuxpaint-stamps-default package first")
    written = write(argv[1])
    print(f"{sum(written.values())} photos in {argv[1]}: " + ", ".join(f"{name} {n}" for name, n in written.items()))


if __name__ == "__main__":
    main(sys.argv)
