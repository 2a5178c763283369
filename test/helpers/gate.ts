// A promise a test opens when it wants: a volume's calls `await gate.pass()` and are held (a slow
// disk) until the test calls release(); `waiting` counts the calls held so far.

export class Gate {
  waiting = 0;
  private open: (() => void) | null = null;
  private readonly p: Promise<void>;
  constructor() {
    this.p = new Promise<void>((r) => (this.open = r));
  }
  async pass(): Promise<void> {
    this.waiting++;
    await this.p;
  }
  release(): void {
    this.open?.();
  }
}
