# client: black-box tests of the command-line clients (moe-client, moectl)
# against a daemon each test starts in a temporary directory.
TESTS += tests/test_replay.sh
EXTRA_DIST += tests/test_replay.sh
TESTS += tests/test_startup.sh
EXTRA_DIST += tests/test_startup.sh
EXTRA_DIST += tests/daemon-env.sh
