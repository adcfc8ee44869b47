"""Make the two Big Buck Bunny clips shipped with apla from the original 1280x720, 25 fps, 132-frame cut.

    python -m apla.assets.make_clips path/to/bigbuckbunny.mp4        # reading the MP4 needs PyAV

writes
    apla/assets/bigbuckbunny_24f_512/00000.jpg ... 00023.jpg   24 frames, 912x512 (shorter side 512), JPEG: the
                                                              real-video example, read with Pillow alone
    tests/data/bigbuckbunny_cut.mp4                            24 frames, 128x72, H.264, for the tests of MP4 reading

Both take frames 0, 5, 10, ..., 115 (24 frames spread over the whole 4.6 s of motion), i.e. 5 fps in real time.
The example is a folder of frames in DAVIS's layout rather than an MP4 so that the SD-size run needs no PyAV.
Big Buck Bunny (c) 2008 Blender Foundation, www.bigbuckbunny.org, CC BY 3.0.
"""

import argparse
import os

from PIL import Image

from apla.checkpoint import atomic_write
from apla.cli import fail
from apla.video import VideoError, count_frames, read_video, to_uint8, write_mp4

NUM_FRAMES = 24  # the paper's clip length
STRIDE = 5  # 24 frames x 5 covers frames 0..115 of the 132
SOURCE_FPS = 25
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
EXAMPLE = os.path.join(ROOT, "apla", "assets", "bigbuckbunny_24f_512")
EXAMPLE_SIZE = (512, 912)  # (H, W), multiples of 8 close to the source's 16:9
JPEG_QUALITY = 90  # 2.8 MB for the 24 frames, 40 dB PSNR against the source's decode (x264 CRF 23 gave 37.6 dB)
TEST_CLIP = os.path.join(ROOT, "tests", "data", "bigbuckbunny_cut.mp4")
TEST_SIZE, TEST_CRF = (72, 128), 18


def write_frames_folder(frames, folder: str, quality: int = JPEG_QUALITY) -> list[str]:
    """(F, 3, H, W) frames in [-1, 1] -> folder/00000.jpg, 00001.jpg, ... (earlier .jpg files there are removed)."""
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        if name.endswith(".jpg"):
            os.remove(os.path.join(folder, name))
    paths = []
    for i, array in enumerate(to_uint8(frames)):  # (H, W, 3) uint8 each
        image = Image.fromarray(array)
        paths.append(atomic_write(os.path.join(folder, f"{i:05d}.jpg"),
                                  lambda tmp: image.save(tmp, format="JPEG", quality=quality, optimize=True)))
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="the original bigbuckbunny.mp4 (1280x720, 25 fps, 132 frames)")
    args = parser.parse_args(argv)
    try:
        print(f"{args.source}: {count_frames(args.source)} frames")
        x = read_video(args.source, NUM_FRAMES, start=0, stride=STRIDE, size=EXAMPLE_SIZE)  # (F, 3, H, W)
        paths = write_frames_folder(x, EXAMPLE)
        print(f"{EXAMPLE}: {tuple(x.shape)}, {sum(os.path.getsize(p) for p in paths)} bytes")
        x = read_video(args.source, NUM_FRAMES, start=0, stride=STRIDE, size=TEST_SIZE)
        write_mp4(x, TEST_CLIP, fps=SOURCE_FPS / STRIDE, crf=TEST_CRF)
        print(f"{TEST_CLIP}: {tuple(x.shape)}, {os.path.getsize(TEST_CLIP)} bytes")
    except VideoError as e:
        fail(str(e))


if __name__ == "__main__":
    main()
