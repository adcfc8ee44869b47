"""Make the two Big Buck Bunny clips shipped with apla from the original 1280x720, 25 fps, 132-frame cut.

    python -m apla.assets.make_clips path/to/bigbuckbunny.mp4

writes
    apla/assets/bigbuckbunny_24f_512.mp4   24 frames, 912x512 (shorter side 512), the real-video example
    tests/data/bigbuckbunny_cut.mp4        24 frames, 128x72, for the tests

Both take frames 0, 5, 10, ..., 115 (24 frames spread over the whole 4.6 s of motion) and play at 25 / 5 = 5 fps,
i.e. in real time. Big Buck Bunny (c) 2008 Blender Foundation, www.bigbuckbunny.org, CC BY 3.0.
"""

import argparse
import os

from apla.video import count_frames, read_video, write_mp4

NUM_FRAMES = 24  # the paper's clip length
STRIDE = 5  # 24 frames x 5 covers frames 0..115 of the 132
SOURCE_FPS = 25
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
OUTPUTS = {  # path -> ((H, W) multiples of 8 close to the source's 16:9, x264 CRF: 23 keeps the example < 1 MB)
    os.path.join(ROOT, "apla", "assets", "bigbuckbunny_24f_512.mp4"): ((512, 912), 23),
    os.path.join(ROOT, "tests", "data", "bigbuckbunny_cut.mp4"): ((72, 128), 18),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="the original bigbuckbunny.mp4 (1280x720, 25 fps, 132 frames)")
    args = parser.parse_args()
    print(f"{args.source}: {count_frames(args.source)} frames")
    for path, (size, crf) in OUTPUTS.items():
        x = read_video(args.source, NUM_FRAMES, start=0, stride=STRIDE, size=size)  # (F, 3, H, W) in [-1, 1]
        write_mp4(x, path, fps=SOURCE_FPS / STRIDE, crf=crf)
        print(f"{path}: {tuple(x.shape)}, {os.path.getsize(path) / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
